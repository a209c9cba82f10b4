"""Evaluation in the strategy world: greedy and k sampled completions per problem, read by the labeller.

Per problem it records what the report needs to pair arms by seed and problem: the greedy completion's
correctness (target format, the primary endpoint), format and strategy; for the k samples their strategies,
formats and correctness (target format, and the strategy's own success in any format), the distinct final
answers, and the paper's signals (mean token entropy of the samples in nats, self-BLEU of the k samples).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from aesl_lightning.data.strategy_world import OTHER, STRATEGIES, answer_format, label_strategy, target_answer

_ANY_ANSWER = re.compile(r"(?:\\boxed\{|Answer: )(-?\d{1,6})")


def any_answer(completion: str) -> int | None:
    """The final answer in either format (for a strategy's success rate, whatever the wrapper)."""
    found = _ANY_ANSWER.findall(completion)
    return int(found[-1]) if found else None


def encode_prompts(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    from aesl_lightning.data.encode import encode_prompt

    ids = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def strategy_entropy(counts: dict[str, int]) -> float:
    """Entropy (bits) of the strategy shares among labelled samples; `other` counts as one more category."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values() if c > 0)


@torch.no_grad()
def evaluate(model, tokenizer, problems: Sequence[dict], samples: int, max_new_tokens: int, seed: int, batch_size: int = 64,
             greedy: bool = True) -> list[dict]:
    """One row per problem (see the module docstring). Sampling at temperature 1 under a fixed seed, without
    moving the caller's RNG."""
    from aesl_lightning.infra.generation import SamplingConfig, eos_ids, generate
    from aesl_lightning.metrics import self_bleu_batch
    from aesl_lightning.modules.sample_metrics import completion_token_groups

    rows: list[dict] = []
    eos = eos_ids(model, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            batch = encode_prompts(tokenizer, [p["prompt"] for p in chunk])
            out = [{"id": f"{p['a']}+{p['b']}", "answer": int(p["answer"])} for p in chunk]
            if greedy:
                g = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], SamplingConfig(1, 0.0, 1.0, max_new_tokens))
                for row, text in zip(out, g.texts):
                    row.update(greedy_correct=int(target_answer(text) == row["answer"]), greedy_format=answer_format(text),
                               greedy_strategy=label_strategy(text), greedy_text=text)
            if samples > 0:
                s = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"],
                             SamplingConfig(samples, 1.0, 1.0, max_new_tokens), record_entropy=True)
                bleu = self_bleu_batch(completion_token_groups(s, samples, eos)) if samples > 1 else [float("nan")] * len(chunk)
                mask = s.completion_mask.float()
                ent = (s.entropy * mask).sum(1) if s.entropy is not None else torch.zeros(len(s.texts))
                for i, row in enumerate(out):
                    span = slice(i * samples, (i + 1) * samples)
                    texts = s.texts[span]
                    strategies = [label_strategy(t) for t in texts]
                    formats = [answer_format(t) for t in texts]
                    answers = [any_answer(t) for t in texts]
                    row.update(
                        strategies=strategies, formats=formats,
                        correct=[int(target_answer(t) == row["answer"]) for t in texts],
                        solved=[int(a == row["answer"]) for a in answers],  # right value in any format
                        distinct_answers=len({a for a in answers}),
                        self_bleu=float(bleu[i]), token_entropy=float(ent[span].sum() / max(float(mask[span].sum()), 1.0)),
                        tokens=float(mask[span].sum()) / samples, sample_texts=texts[:2],
                    )
            rows.extend(out)
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """Means over problems; strategy shares and per-strategy success pooled over all samples."""
    from aesl_lightning.metrics import pass_at_k

    n = len(rows)
    out: dict = {"problems": n}
    if n == 0:
        return out
    if "greedy_correct" in rows[0]:
        out["greedy_accuracy"] = sum(r["greedy_correct"] for r in rows) / n
        out["greedy_target_rate"] = sum(r["greedy_format"] == "target" for r in rows) / n
    if "strategies" in rows[0]:
        k = len(rows[0]["strategies"])
        counts = Counter(s for r in rows for s in r["strategies"])
        total = n * k
        out["strategy_shares"] = {s: counts.get(s, 0) / total for s in (*STRATEGIES, OTHER)}
        out["strategy_entropy_pooled"] = strategy_entropy({s: counts.get(s, 0) for s in (*STRATEGIES, OTHER)})
        out["strategy_entropy"] = sum(strategy_entropy(Counter(r["strategies"])) for r in rows) / n  # within a problem's k samples
        out["strategies_per_problem"] = sum(len(set(r["strategies"]) - {OTHER}) for r in rows) / n
        success = {}
        for s in STRATEGIES:
            hits = [ok for r in rows for st, ok in zip(r["strategies"], r["solved"]) if st == s]
            success[s] = {"n": len(hits), "success": sum(hits) / len(hits) if hits else float("nan")}
        out["strategy_success"] = success
        out["target_rate"] = sum(f == "target" for r in rows for f in r["formats"]) / total
        out["native_rate"] = sum(f == "native" for r in rows for f in r["formats"]) / total
        pass1 = sum(sum(r["correct"]) / k for r in rows) / n
        passk = sum(pass_at_k(k, sum(r["correct"]), k) for r in rows) / n
        out.update({"pass@1": pass1, "pass@k": passk, "pass@k_minus_pass@1": passk - pass1, "k": k,
                    "distinct_answers": sum(r["distinct_answers"] for r in rows) / n,
                    "self_bleu": _nanmean([r["self_bleu"] for r in rows]), "token_entropy": sum(r["token_entropy"] for r in rows) / n,
                    "sample_tokens": sum(r["tokens"] for r in rows) / n,
                    "zero_variance_share": sum(1 for r in rows if sum(r["correct"]) in (0, k)) / n})
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def columns(rows: Sequence[dict]) -> dict:
    """The per-problem numbers a report pairs on, column by column (small enough to commit): greedy
    correctness and strategy, per-strategy sample counts (direct, round, column, other), target-format
    correct / right-value / target-format counts among the k samples, distinct answers, self-BLEU and token
    entropy (4 decimals)."""
    order = (*STRATEGIES, OTHER)
    out: dict = {"id": [r["id"] for r in rows]}
    if rows and "greedy_correct" in rows[0]:
        out["greedy_correct"] = [r["greedy_correct"] for r in rows]
        out["greedy_strategy"] = [order.index(r["greedy_strategy"]) for r in rows]
        out["greedy_target"] = [int(r["greedy_format"] == "target") for r in rows]
    if rows and "strategies" in rows[0]:
        out["strategy_counts"] = [[r["strategies"].count(s) for s in order] for r in rows]
        out["correct"] = [sum(r["correct"]) for r in rows]
        out["solved"] = [sum(r["solved"]) for r in rows]
        out["target"] = [sum(f == "target" for f in r["formats"]) for r in rows]
        out["distinct_answers"] = [r["distinct_answers"] for r in rows]
        out["self_bleu"] = [round(r["self_bleu"], 4) for r in rows]
        out["token_entropy"] = [round(r["token_entropy"], 4) for r in rows]
        out["examples"] = [r["sample_texts"][0] for r in rows[:3]]
    return out
