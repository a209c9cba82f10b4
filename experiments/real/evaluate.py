"""Per-problem evaluation of a model on word problems: greedy decoding and k samples, as compact columns.

`evaluate` returns one column per measure, one value per problem, in file order, with each problem's `key` as
its `id`, so arms pair by seed and by problem from the unit records alone (`aesl_lightning.study.stats`):

- greedy: `greedy_correct` (0/1, `math_accuracy`), `greedy_boxed` (0/1, `boxed_format`), `greedy_tokens`,
  `greedy_truncated` (hit `max_new_tokens`);
- k samples at temperature 1: `correct` and `boxed` (counts of k), `distinct_answers` (distinct final answers as
  the reward reads them, `final_answer`), `paths` (distinct computation paths among the boxed samples,
  `operations.distinct_paths`), `entropy` (mean nats per sampled token), `self_bleu` (of the k samples), `tokens`
  (mean sampled length).

`summarise(columns, k)` gives the means the report and the rules read; it needs nothing but the columns.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from real.operations import distinct_paths

ROUND = 4


def final_answer(text: str) -> str:
    """The answer a completion commits to, as the reward reads it (`aesl_lightning.scoring.rewards.final_answers`), with
    `\\boxed{}`, `$`, whitespace and thousands separators removed ("" when there is none): "\\boxed{1,000}" and
    "1000" count once among distinct answers."""
    from aesl_lightning.scoring.rewards import final_answers

    answers, reason = final_answers(text)
    if reason is not None or not answers:
        return ""
    cleaned = []
    for answer in answers:
        if answer.startswith("\\boxed{") and answer.endswith("}"):
            answer = answer[len("\\boxed{"):-1]
        cleaned.append(re.sub(r"[\s,$]", "", answer))
    return "|".join(cleaned)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model, tokenizer, path: str | Path, samples: int, max_new_tokens: int, seed: int, batch_size: int = 32,
             limit: int | None = None, greedy: bool = True) -> dict:
    """`{"columns", "summary", "seconds", "examples"}` for the first `limit` problems of the JSONL file `path`
    (module docstring). Sampling is seeded by `seed` without moving the caller's random state."""
    from aesl_lightning.data.encode import collate_prompts, encode_prompt_examples
    from aesl_lightning.data.formats import load_prompt_examples

    examples = load_prompt_examples(str(path))[:limit]
    encoded, _ = encode_prompt_examples(tokenizer, examples, max_length=1024, overlong="error")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    columns: dict[str, list] = {"id": [str(item.extra.get("key", item.source)) for item in encoded]}
    examples_out: list[dict] = []
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(encoded), batch_size):
            batch = collate_prompts(encoded[start:start + batch_size], pad)
            batch["input_ids"], batch["attention_mask"] = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out = _evaluate_batch(model, tokenizer, batch, samples, max_new_tokens, greedy)
            for key, values in out.items():
                if key == "examples":
                    examples_out.extend(values[: max(0, 3 - len(examples_out))])
                else:
                    columns.setdefault(key, []).extend(values)
    return {"columns": columns, "summary": summarise(columns, samples), "seconds": time.perf_counter() - began, "examples": examples_out}


def _evaluate_batch(model, tokenizer, batch: dict, k: int, max_new_tokens: int, greedy: bool) -> dict:
    from aesl_lightning.infra.generation import SamplingConfig, eos_ids, generate
    from aesl_lightning.metrics import self_bleu_batch
    from aesl_lightning.modules.sample_metrics import completion_token_groups
    from aesl_lightning.scoring.rewards import boxed_format, math_accuracy

    prompts, answers = batch["prompt"], batch["answer"]
    out: dict[str, list] = {"examples": []}
    if greedy:
        g = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], SamplingConfig(1, 0.0, 1.0, max_new_tokens))
        out["greedy_correct"] = [int(c or 0) for c in math_accuracy(prompts, g.texts, answer=answers)]
        out["greedy_boxed"] = [int(b) for b in boxed_format(prompts, g.texts)]
        out["greedy_tokens"] = [int(n) for n in g.lengths.tolist()]
        out["greedy_truncated"] = [int(t) for t in g.truncated.tolist()]
        out["examples"] = [{"prompt": p, "greedy": t} for p, t in zip(prompts, g.texts)]
    if k > 0:
        s = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], SamplingConfig(k, 1.0, 1.0, max_new_tokens),
                     record_entropy=True)
        repeat = lambda values: [v for v in values for _ in range(k)]  # noqa: E731
        correct = [int(c or 0) for c in math_accuracy(repeat(prompts), s.texts, answer=repeat(answers))]
        boxed = [int(b) for b in boxed_format(repeat(prompts), s.texts)]
        bleu = self_bleu_batch(completion_token_groups(s, k, eos_ids(model, tokenizer))) if k > 1 else [float("nan")] * len(prompts)
        mask = s.completion_mask.float()
        entropy = (s.entropy * mask).sum(1) if s.entropy is not None else torch.zeros(len(s.texts), device=mask.device)
        for key in ("correct", "boxed", "distinct_answers", "paths", "entropy", "self_bleu", "tokens"):
            out[key] = []
        for i in range(len(prompts)):
            span = slice(i * k, (i + 1) * k)
            texts = s.texts[span]
            out["correct"].append(sum(correct[span]))
            out["boxed"].append(sum(boxed[span]))
            out["distinct_answers"].append(len({final_answer(t) for t in texts}))
            out["paths"].append(distinct_paths(texts, boxed[span]))
            out["entropy"].append(round(float(entropy[span].sum() / mask[span].sum().clamp(min=1.0)), ROUND))
            out["self_bleu"].append(None if math.isnan(bleu[i]) else round(float(bleu[i]), ROUND))
            out["tokens"].append(round(float(mask[span].sum()) / k, 2))
            if i < len(out["examples"]):
                out["examples"][i]["samples"] = texts[:2]
            elif i < 3:
                out["examples"].append({"prompt": prompts[i], "samples": texts[:2]})
    return out


def _mean(values: Sequence) -> float:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else float("nan")


def summarise(columns: dict, k: int) -> dict:
    """Means over problems: greedy accuracy / boxed rate / tokens / truncated rate; with samples pass@1, pass@k,
    pass@k - pass@1, distinct answers, distinct paths (over problems with a boxed sample), sample boxed rate,
    entropy, self-BLEU, sampled tokens and the share of zero-variance problems (all k right or all wrong)."""
    from aesl_lightning.metrics import pass_at_k

    n = len(columns["id"])
    out: dict = {"problems": n}
    if n == 0:
        return out
    if "greedy_correct" in columns:
        out.update(greedy_accuracy=_mean(columns["greedy_correct"]), greedy_boxed_rate=_mean(columns["greedy_boxed"]),
                   greedy_tokens=_mean(columns["greedy_tokens"]), greedy_truncated_rate=_mean(columns["greedy_truncated"]))
    if k > 0 and "correct" in columns:
        pass1 = _mean([c / k for c in columns["correct"]])
        passk = _mean([pass_at_k(k, c, k) for c in columns["correct"]])
        out.update({"k": k, "pass@1": pass1, "pass@k": passk, "pass@k_minus_pass@1": passk - pass1,
                    "distinct_answers": _mean(columns["distinct_answers"]),
                    "distinct_paths": _mean([p for p, b in zip(columns["paths"], columns["boxed"]) if b > 0]),
                    "sample_boxed_rate": _mean([b / k for b in columns["boxed"]]), "entropy": _mean(columns["entropy"]),
                    "self_bleu": _mean(columns["self_bleu"]), "sample_tokens": _mean(columns["tokens"]),
                    "zero_variance_share": _mean([int(c in (0, k)) for c in columns["correct"]])})
    return out
