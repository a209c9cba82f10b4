"""The real-model track: does a diversity-aware cold start make SmolLM2-135M-Instruct a better RL starting point?

    python experiments/track_real.py --preflight               # data, base measurement, timings -> preflight.json
    python experiments/track_real.py --preflight --grpo-check  # + 10 GRPO steps from a CE checkpoint (slow)
    python experiments/track_real.py --run                     # the pre-registered study, resumable
    python experiments/track_real.py --report                  # results.md / results.json from finished runs

The design, the claims and the verdict rules are fixed in `experiments/results/real/plan.md` (written before
any run); the sizes in `experiments/real_track.yaml`. Every training stage is the toolkit itself (SFTModule,
GRPOModule, the data modules reading the JSONL splits of `aesl_lightning.data.word_problems`); evaluation is
per problem (`evaluate_problems`), so that arms can be paired by seed and by problem (`aesl_lightning/study/stats.py`).
Each finished run writes `<out>/runs/<run id>.json` atomically (the CPU track's records, imported from
`reproduce.py`); a rerun skips those.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "experiments"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import reproduce as cpu_track  # noqa: E402  (run records, machine/commit, History, TrainLog)
from reproduce import Run, atomic_write_json, read_json  # noqa: E402

DEFAULT_CONFIG = REPO / "experiments" / "real_track.yaml"
DEFAULT_OUT = REPO / "experiments" / "results" / "real"
DEFAULT_WORK = REPO / "lightning_logs" / "track_real"


# ----------------------------------------------------------------------------------------------------
# Configuration


_REQUIRED = {"model": None, "data": ("seed", "coldstart", "val", "rl", "test", "test_hard", "instruction"), "seeds": None,
             "sft": ("max_steps", "batch_size", "lr", "warmup_steps", "scheduler", "lora_rank", "grid", "turning_point", "aesl",
                     "aesl_anchored"),
             "grpo": ("steps", "prompts", "num_generations", "lr", "beta", "max_new_tokens", "reward_weights", "sweep_steps"),
             "eval": ("samples", "max_new_tokens", "batch_size", "val_problems", "test_problems", "test_hard_problems"),
             "preflight": ("base_problems", "sft_timing_steps", "grpo_check_sft_steps", "grpo_check_steps")}


def load_config(path: str | Path) -> dict:
    """The track's YAML as a dict; every section and field of `_REQUIRED` must be there, and no other."""
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, found {type(config).__name__}")
    for section, fields in _REQUIRED.items():
        if section not in config:
            raise ValueError(f"{path}: missing section {section!r}")
        if fields is not None:
            found = set(config[section] or {})
            missing, unknown = set(fields) - found, found - set(fields)
            if missing or unknown:
                raise ValueError(f"{path}: section {section!r}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    unknown = set(config) - set(_REQUIRED)
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
    grid = config["sft"]["grid"]
    if grid[0] != 0 or grid != sorted(set(grid)) or grid[-1] != config["sft"]["max_steps"]:
        raise ValueError(f"{path}: sft.grid must start at 0, increase strictly and end at sft.max_steps "
                         f"({config['sft']['max_steps']}), found {grid}")
    return config


class Paths(cpu_track.Paths):
    """`out`: results (run records, reports); `work`: data, weights and logs (git-ignored)."""


# ----------------------------------------------------------------------------------------------------
# Data


def make_data(config: dict, paths: Paths) -> dict:
    """The word-problem splits as JSONL in `<work>/data`, with their sizes and sha256 digests."""
    from aesl_lightning.data.word_problems import EASY, HARD, make_splits, write_splits

    d = config["data"]
    sizes = {name: d[name] for name in ("coldstart", "val", "rl", "test", "test_hard")}
    easy = EASY.__class__(**{**vars(EASY), "instruction": d["instruction"]})
    hard = HARD.__class__(**{**vars(HARD), "instruction": d["instruction"]})
    files = write_splits(make_splits(sizes, seed=d["seed"], easy=easy, hard=hard), paths.data)
    return {"sizes": sizes, "sha256": {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files.items()}}


def ensure_data(config: dict, paths: Paths) -> dict:
    """Write the splits unless the recorded ones are on disk; regenerated splits must match the record."""
    record_path = paths.result("data")
    if record_path.is_file():
        record = read_json(record_path)
        if all((paths.data / f"{name}.jsonl").is_file() for name in record["sizes"]):
            return record
        regenerated = make_data(config, paths)
        if regenerated["sha256"] != record["sha256"]:
            raise SystemExit(f"{record_path}: the regenerated splits differ from the recorded ones; the generator changed")
        return record
    record = make_data(config, paths)
    atomic_write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------------------------------
# Per-problem evaluation


def final_answer(text: str) -> str:
    """The answer a completion commits to, as the reward reads it (`aesl_lightning.rewards.final_answers`):
    its boxed answers, else the text after "answer is", else its last line; "" when there is none or the
    reward would score it 0 for its form. For "distinct final answers among k samples": `\\boxed{}`, `$`,
    whitespace and thousands separators are removed, so "\\boxed{1,000}" and "1000" count once."""
    from aesl_lightning.rewards import final_answers

    answers, reason = final_answers(text)
    if reason is not None or not answers:
        return ""
    cleaned = []
    for answer in answers:
        if answer.startswith("\\boxed{") and answer.endswith("}"):
            answer = answer[len("\\boxed{") : -1]
        cleaned.append(re.sub(r"[\s,$]", "", answer))
    return "|".join(cleaned)


@dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated: `samples` completions at `temperature` (0: no sampling) and one greedy."""

    samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 160
    batch_size: int = 32
    seed: int = 0


def evaluate_problems(model, tokenizer, path: str | Path, settings: EvalSettings, limit: int | None = None) -> dict:
    """`{"rows": [...], "summary": {...}, "timing": {...}}` for the first `limit` problems of `path`.

    Row: `greedy_correct`, `greedy_boxed`, `greedy_tokens`, and with samples `correct` (count of k),
    `boxed` (count), `distinct_answers`, `self_bleu`, `entropy` (mean nats per sampled token), `tokens`.
    Summary: greedy accuracy and boxed rate, pass@1 (mean sample accuracy), pass@k (unbiased; with n = k
    samples it is the share of problems with a correct sample), pass@k - pass@1, mean distinct answers,
    sample boxed rate, self-BLEU, entropy, mean completion tokens. Timing: seconds and tokens per second of
    greedy decoding and of sampling.
    """
    import torch

    from aesl_lightning.data.encode import encode_prompt_examples
    from aesl_lightning.data.formats import load_prompt_examples
    from aesl_lightning.generation import eos_ids

    examples = load_prompt_examples(str(path))[:limit]
    encoded, dropped = encode_prompt_examples(tokenizer, examples, max_length=1024, overlong="error")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(model, tokenizer)
    rows: list[dict] = []
    timing = {"greedy_seconds": 0.0, "greedy_tokens": 0, "sample_seconds": 0.0, "sample_tokens": 0}
    with torch.random.fork_rng(devices=[]):  # seeded samples without moving the caller's RNG (SFT continues unchanged)
        torch.manual_seed(settings.seed)
        for start in range(0, len(encoded), settings.batch_size):
            rows.extend(_evaluate_batch(model, tokenizer, encoded[start : start + settings.batch_size], pad, eos, settings, timing))
    k = settings.samples if settings.temperature > 0 else 0
    return {"rows": rows, "summary": summarise_rows(rows, k), "timing": _rates(timing), "dropped": dropped, "settings": vars(settings)}


def _evaluate_batch(model, tokenizer, chunk: list, pad: int, eos: list[int], settings: EvalSettings, timing: dict) -> list[dict]:
    import torch

    from aesl_lightning.data.encode import collate_prompts
    from aesl_lightning.generation import SamplingConfig, generate
    from aesl_lightning.metrics import self_bleu_batch
    from aesl_lightning.rewards import boxed_format, math_accuracy
    from aesl_lightning.sample_metrics import completion_token_groups

    k = settings.samples
    batch = collate_prompts(chunk, pad)
    prompts, answers = batch["prompt"], batch["answer"]
    began = time.perf_counter()
    greedy = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], SamplingConfig(1, 0.0, 1.0, settings.max_new_tokens))
    timing["greedy_seconds"] += time.perf_counter() - began
    timing["greedy_tokens"] += int(greedy.lengths.sum())
    g_correct = math_accuracy(prompts, greedy.texts, answer=answers)
    g_boxed = boxed_format(prompts, greedy.texts)
    # `id`: the problem's key (word problems) or its line in the file: stable across work folders, for pairing
    batch_rows = [{"id": str(item.extra.get("key", Path(item.source).name)), "source": item.source, "answer": item.answer, "greedy_correct": int(c or 0), "greedy_boxed": int(b),
                   "greedy_tokens": int(n), "greedy_truncated": int(cut), "greedy_text": t}
                  for item, c, b, n, cut, t in zip(chunk, g_correct, g_boxed, greedy.lengths.tolist(), greedy.truncated.tolist(), greedy.texts)]
    if k > 0 and settings.temperature > 0:
        began = time.perf_counter()
        sampled = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"],
                           SamplingConfig(k, settings.temperature, 1.0, settings.max_new_tokens), record_entropy=True)
        timing["sample_seconds"] += time.perf_counter() - began
        timing["sample_tokens"] += int(sampled.lengths.sum())
        repeated_prompts = [p for p in prompts for _ in range(k)]
        correct = math_accuracy(repeated_prompts, sampled.texts, answer=[a for a in answers for _ in range(k)])
        boxed = boxed_format(repeated_prompts, sampled.texts)
        bleu = self_bleu_batch(completion_token_groups(sampled, k, eos))
        mask = sampled.completion_mask.float()
        entropy = (sampled.entropy * mask).sum(1) if sampled.entropy is not None else torch.zeros(len(sampled.texts))
        for i, row in enumerate(batch_rows):
            span = slice(i * k, (i + 1) * k)
            texts = sampled.texts[span]
            row.update(correct=int(sum(c or 0 for c in correct[span])), boxed=int(sum(boxed[span])),
                       distinct_answers=len({final_answer(t) for t in texts}),
                       self_bleu=float(bleu[i]), entropy=float(entropy[span].sum() / max(mask[span].sum(), 1.0)),
                       tokens=float(mask[span].sum() / k), samples=k, sample_texts=texts)
    return batch_rows


def _rates(timing: dict) -> dict:
    out = dict(timing)
    for kind in ("greedy", "sample"):
        seconds = timing[f"{kind}_seconds"]
        out[f"{kind}_tokens_per_second"] = timing[f"{kind}_tokens"] / seconds if seconds > 0 else float("nan")
    return out


def summarise_rows(rows: list[dict], k: int) -> dict:
    """Means over problems of the per-problem rows (see `evaluate_problems`)."""
    from aesl_lightning.metrics import pass_at_k

    n = len(rows)
    if n == 0:
        return {}
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    out = {"problems": n, "greedy_accuracy": mean("greedy_correct"), "greedy_boxed_rate": mean("greedy_boxed"),
           "greedy_tokens": mean("greedy_tokens")}
    if "greedy_truncated" in rows[0]:
        out["greedy_truncated_rate"] = mean("greedy_truncated")
    if k > 0 and rows and "correct" in rows[0]:
        pass1 = sum(r["correct"] / k for r in rows) / n
        passk = sum(pass_at_k(k, r["correct"], k) for r in rows) / n
        bleu = [r["self_bleu"] for r in rows if not math.isnan(r["self_bleu"])]
        out.update({"pass@1": pass1, f"pass@{k}": passk, "pass@k_minus_pass@1": passk - pass1, "k": k,
                    "distinct_answers": mean("distinct_answers"), "sample_boxed_rate": sum(r["boxed"] / k for r in rows) / n,
                    "self_bleu": sum(bleu) / len(bleu) if bleu else float("nan"), "entropy": mean("entropy"),
                    "sample_tokens": mean("tokens"),
                    "zero_variance_share": sum(1 for r in rows if r["correct"] in (0, k)) / n})
    return out


# ----------------------------------------------------------------------------------------------------
# Pre-flight


def quiet(threads: int | None = None) -> None:
    """Fewer library messages in the records' logs; `threads` torch threads if given."""
    import logging
    import os
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def eval_settings(config: dict, seed: int = 0) -> EvalSettings:
    e = config["eval"]
    return EvalSettings(samples=e["samples"], temperature=1.0, max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"], seed=seed)


def measure_base(config: dict, paths: Paths) -> dict:
    """The base model on the first `preflight.base_problems` test problems: greedy, and k samples."""
    from aesl_lightning.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(config["model"]), load_causal_lm(config["model"])
    result = evaluate_problems(model, tokenizer, paths.data / "test.jsonl", eval_settings(config), limit=config["preflight"]["base_problems"])
    # the hard split greedily only: the go/no-go rules read the test split, and sampling is the slow part on CPU
    greedy = EvalSettings(**{**vars(eval_settings(config)), "samples": 0, "temperature": 0.0})
    hard = evaluate_problems(model, tokenizer, paths.data / "test_hard.jsonl", greedy, limit=config["preflight"]["base_problems"])
    return {"test": result, "test_hard": hard}


class StepTimer:
    """Wall seconds of every training step (a Lightning callback, built lazily so that --help needs no Lightning)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._start = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self._start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.seconds.append(time.perf_counter() - self._start)

        return _Timer()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float("nan") if n == 0 else (ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def sft_module(config: dict, start: str, loss: dict, lora_rank: int | None):
    """The toolkit's SFTModule as the study builds it (no validation generation: the grid callback evaluates)."""
    from aesl_lightning import SFTModule
    from aesl_lightning.lora import LoRAConfig
    from aesl_lightning.losses import LossConfig
    from aesl_lightning.sft import ValidationGeneration

    s = config["sft"]
    off = ValidationGeneration(num_prompts=0, num_samples=0, kl_to_base=False)  # GridEval evaluates instead
    return SFTModule(name_or_path=start, loss=LossConfig(**loss), lr=s["lr"], warmup_steps=s["warmup_steps"], scheduler=s["scheduler"],
                     lora=LoRAConfig(r=lora_rank) if lora_rank else None, val_generation=off, histogram_every_n_steps=0)


def sft_data(config: dict, paths: Paths, seed: int):
    from aesl_lightning import SFTDataModule

    return SFTDataModule(train=str(paths.data / "coldstart.jsonl"), val=str(paths.data / "val.jsonl"),
                         batch_size=config["sft"]["batch_size"], max_length=512, seed=seed)


def time_sft_steps(config: dict, paths: Paths, lora_rank: int | None) -> dict:
    """Median wall seconds of a CE SFT step (after the first, which warms up) for full fine-tuning or LoRA."""
    import lightning as L

    steps = config["preflight"]["sft_timing_steps"]
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    run_dir = paths.run_dir(f"preflight/sft_timing_{'lora' if lora_rank else 'full'}")
    trainer = cpu_track._trainer(run_dir, "logs", max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, callbacks=[timer])
    trainer.fit(sft_module(config, config["model"], {"name": "ce"}, lora_rank), datamodule=sft_data(config, paths, 0))
    return {"lora_rank": lora_rank, "step_seconds": timer.seconds, "median_after_first": _median(timer.seconds[1:]),
            "batch_size": config["sft"]["batch_size"]}


def grpo_check(config: dict, paths: Paths) -> dict:
    """Go/no-go: CE SFT for `grpo_check_sft_steps`, then `grpo_check_steps` GRPO steps; the training reward
    must rise by >= 0.05 (mean of the last half of the steps minus the first half, and the OLS slope)."""
    import lightning as L

    from aesl_lightning.study.stats import ols_slope

    p = config["preflight"]
    L.seed_everything(0, verbose=False)
    run_dir = paths.run_dir("preflight/grpo_check")
    trainer = cpu_track._trainer(run_dir, "sft", max_steps=p["grpo_check_sft_steps"], enable_checkpointing=False,
                                 num_sanity_val_steps=0, limit_val_batches=0)
    module = sft_module(config, config["model"], {"name": "ce"}, config["sft"]["lora_rank"])
    trainer.fit(module, datamodule=sft_data(config, paths, 0))
    start = module.export_hf(run_dir / "ce_start", overwrite=True)
    del module
    record = run_grpo_steps(config, paths, "preflight/grpo_check/grpo", str(start), seed=0, steps=p["grpo_check_steps"])
    rewards = [r["train/reward/mean"] for r in record["per_step"]]
    half = len(rewards) // 2
    gain = sum(rewards[half:]) / (len(rewards) - half) - sum(rewards[:half]) / max(half, 1)
    return {**record, "reward_gain_halves": gain, "reward_slope_per_step": ols_slope(list(range(len(rewards))), rewards),
            "passes": gain >= 0.05}


def grpo_module(config: dict, start: str, lora_rank: int | None):
    """The toolkit's GRPOModule as the study builds it: math accuracy + 0.1 x boxed format, Dr. GRPO aggregation."""
    from aesl_lightning.grpo import GRPOConfig, GRPOEvaluation, GRPOModule
    from aesl_lightning.lora import LoRAConfig

    g = config["grpo"]
    grpo = GRPOConfig(num_generations=g["num_generations"], temperature=1.0, max_new_tokens=g["max_new_tokens"], beta=g["beta"],
                      epsilon=0.2, epsilon_high=0.28, loss_type="dr_grpo", scale_rewards="group", log_completions_every_n_steps=10,
                      reward_funcs=["aesl_lightning.rewards.math_accuracy", "aesl_lightning.rewards.boxed_format"],
                      reward_weights=list(g["reward_weights"]))
    return GRPOModule(name_or_path=start, grpo=grpo, evaluation=GRPOEvaluation(num_samples=0, greedy=False), lr=g["lr"],
                      scheduler="constant", lora=LoRAConfig(r=lora_rank) if lora_rank else None)


def run_grpo_steps(config: dict, paths: Paths, run_id: str, start: str, seed: int, steps: int, export: bool = False) -> dict:
    """`steps` GRPO steps from `start` on the RL prompts; per-step rollout numbers; optionally the HF export."""
    import lightning as L

    from aesl_lightning import PromptDataModule

    run_dir = paths.run_dir(run_id)
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt
    L.seed_everything(seed, workers=True, verbose=False)
    module = grpo_module(config, start, config["sft"]["lora_rank"])
    data = PromptDataModule(train=str(paths.data / "rl.jsonl"), val_size=0, batch_size=config["grpo"]["prompts"], max_prompt_length=512,
                            seed=seed)
    log, timer = cpu_track.TrainLog(), StepTimer()
    trainer = cpu_track._trainer(run_dir, "logs", max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, callbacks=[log, timer])
    trainer.fit(module, datamodule=data)
    record = {"start": start, "seed": seed, "steps": trainer.global_step, "per_step": log.rows, "step_seconds": timer.seconds,
              "median_step_seconds": _median(timer.seconds)}
    if export:
        record["export"] = str(module.export_hf(run_dir / "final", overwrite=True))
    return record


def machine_load() -> str:
    """The 1/5/15-minute load averages and the busiest other processes, for the timing records."""
    import os
    import subprocess

    load = os.getloadavg()
    try:
        top = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[1:4]
    except (OSError, subprocess.SubprocessError):
        top = []
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; busiest: " + "; ".join(line.strip() for line in top)


def preflight(config: dict, paths: Paths, grpo: bool, threads: int) -> dict:
    """Every pre-flight measurement as its own run record (`preflight/...`), skipped when already recorded."""
    quiet(threads)
    ensure_data(config, paths)
    steps = [("preflight/base", lambda: measure_base(config, paths)),
             ("preflight/sft_timing_full", lambda: time_sft_steps(config, paths, None)),
             ("preflight/sft_timing_lora", lambda: time_sft_steps(config, paths, 16))]
    if grpo:
        steps.append(("preflight/grpo_check", lambda: grpo_check(config, paths)))
    for run_id, job in steps:
        if paths.result(run_id).is_file():
            continue
        before, started = machine_load(), time.perf_counter()
        result = job()
        result.update(wall_seconds=time.perf_counter() - started, load_before=before, load_after=machine_load(),
                      finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), commit=cpu_track.commit(), threads=threads)
        atomic_write_json(paths.result(run_id), result)
    return {run_id: read_json(paths.result(run_id)) for run_id, _ in steps if paths.result(run_id).is_file()}


# ----------------------------------------------------------------------------------------------------
# The study: SFT with evaluation on the log-spaced grid, starting points, GRPO, paired evaluation

ARMS = ("rl_only", "ce_best_acc", "ce_turning_point", "ce_end", "dft", "aesl", "aesl_anchored")
ARM_LABELS = {"rl_only": "RL only (base model)", "ce_best_acc": "CE, best val accuracy", "ce_turning_point": "CE, diversity turning point",
              "ce_end": "CE, end of SFT", "dft": "DFT, end of SFT", "aesl": "AESL (default), end of SFT",
              "aesl_anchored": "AESL, best base-anchored variant, end of SFT"}
SFT_LOSS_OF_ARM = {"ce_best_acc": "ce", "ce_turning_point": "ce", "ce_end": "ce", "dft": "dft", "aesl": "aesl", "aesl_anchored": "aesl_anchored"}
# The turning point of plan.md: the paper's diversity signal (entropy up, self-BLEU down) on the grid, smoothed
TURNING_POINT_MONITOR = ["val/entropy", "val/self_bleu"]


def active_arms(config: dict) -> tuple[str, ...]:
    return tuple(a for a in ARMS if a != "aesl_anchored" or config["sft"]["aesl_anchored"] is not None)


def loss_fields(config: dict, loss: str) -> dict:
    """LossConfig fields of one SFT objective: ce, dft, aesl (the default) or aesl_anchored (its own fields)."""
    if loss in ("ce", "dft"):
        return {"name": loss}
    fields = config["sft"]["aesl"] if loss == "aesl" else config["sft"]["aesl_anchored"]
    return {"name": "aesl", **fields}


class GridEval:
    """Evaluate on the validation prompts at every grid step (step 0 = the starting model, before any update),
    and optionally export a Hugging Face snapshot there (a Lightning callback, built lazily)."""

    def __new__(cls, config: dict, paths: Paths, grid: list[int], seed: int, snapshot_dir: Path | None):
        from lightning.pytorch.callbacks import Callback

        settings = eval_settings(config, seed)
        limit = config["eval"]["val_problems"]

        class _GridEval(Callback):
            def __init__(self) -> None:
                self.rows: list[dict] = []

            def _evaluate(self, trainer, module) -> None:
                step = trainer.global_step
                result = evaluate_problems(module.model, module.tokenizer, paths.data / "val.jsonl", settings, limit=limit)
                row = {"step": step, **{f"val/{k}": v for k, v in result["summary"].items()},
                       "val/correct_by_problem": [r["greedy_correct"] for r in result["rows"]]}
                loss = trainer.callback_metrics.get("train/loss")
                if loss is not None and step > 0:
                    row["train/loss"] = float(loss)
                self.rows.append(row)
                if snapshot_dir is not None:
                    module.export_hf(snapshot_dir / f"step{step:05d}", overwrite=True)

            def on_train_start(self, trainer, module) -> None:
                if trainer.global_step == 0 and 0 in grid:
                    self._evaluate(trainer, module)

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                if trainer.global_step in grid and (not self.rows or self.rows[-1]["step"] != trainer.global_step):
                    self._evaluate(trainer, module)

        return _GridEval()


def turning_point(history: list[dict], config: dict) -> dict:
    """The peak of the smoothed diversity score over the grid (the toolkit's TurningPointRule, offline).

    `boundary` is True when the peak is the first or the last grid point: then there is no interior peak.
    """
    from aesl_lightning.early_stopping import TurningPointConfig, TurningPointRule

    tp = config["sft"]["turning_point"]
    rule = TurningPointRule(TurningPointConfig(monitor=TURNING_POINT_MONITOR, smoothing=tp["smoothing"], alpha=tp["alpha"],
                                               patience=tp["patience"], min_delta=tp["min_delta"]))
    for row in history:
        rule.update({k: row.get(k, math.nan) for k in TURNING_POINT_MONITOR}, step=row["step"])
    chosen = rule.turning_point or rule.peak
    steps = [row["step"] for row in history]
    return {"step": chosen["step"], "fired": rule.fired, "boundary": chosen["step"] in (steps[0], steps[-1]),
            "scores": [e["score_smoothed"] for e in rule.history]}


def best_accuracy_step(history: list[dict]) -> int:
    """The first grid step after 0 with the highest validation greedy accuracy (ties: the earlier)."""
    trained = [r for r in history if r["step"] > 0]
    best = max(r["val/greedy_accuracy"] for r in trained)
    return next(r["step"] for r in trained if r["val/greedy_accuracy"] == best)


def run_sft(config: dict, paths: Paths, run_id: str, loss: str, seed: int) -> dict:
    """One cold-start SFT run to `sft.max_steps`, evaluated on the grid; CE keeps a snapshot at every grid step."""
    import lightning as L

    run_dir = paths.run_dir(run_id)
    shutil.rmtree(run_dir, ignore_errors=True)
    L.seed_everything(seed, workers=True, verbose=False)
    grid = config["sft"]["grid"]
    snapshots = run_dir / "snapshots" if loss == "ce" else None
    grid_eval = GridEval(config, paths, grid, seed, snapshots)
    trainer = cpu_track._trainer(run_dir, "logs", max_steps=config["sft"]["max_steps"], max_epochs=-1, gradient_clip_val=1.0,
                                 enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[grid_eval])
    module = sft_module(config, config["model"], loss_fields(config, loss), config["sft"]["lora_rank"])
    started = time.perf_counter()
    trainer.fit(module, datamodule=sft_data(config, paths, seed))
    final = module.export_hf(run_dir / "final", overwrite=True)
    record = {"loss": loss, "loss_fields": loss_fields(config, loss), "seed": seed, "history": grid_eval.rows,
              "final": str(final), "train_seconds": time.perf_counter() - started}
    record["turning_point"] = turning_point(grid_eval.rows, config)
    record["best_accuracy_step"] = best_accuracy_step(grid_eval.rows)
    return record


def starting_point(config: dict, paths: Paths, arm: str, seed: int) -> tuple[str, int | None]:
    """(model folder RL starts from, its SFT step; None for the base model)."""
    if arm == "rl_only":
        return config["model"], None
    sft_id = f"sft/{SFT_LOSS_OF_ARM[arm]}-s{seed}"
    record = read_json(paths.result(sft_id))
    step = {"ce_best_acc": record["best_accuracy_step"], "ce_turning_point": record["turning_point"]["step"]}.get(arm)
    if step is None:  # the folder from this work directory, not the recorded path: a moved or fresh checkout resumes
        return str(paths.run_dir(sft_id) / "final"), config["sft"]["max_steps"]
    if step == 0:
        return config["model"], 0  # a peak at step 0 is the base model itself
    return str(paths.run_dir(sft_id) / "snapshots" / f"step{step:05d}"), step


def evaluate_model(config: dict, paths: Paths, model_dir: str, seed: int) -> dict:
    """Per-problem rows on both test splits (the paired data of the primary endpoint)."""
    from aesl_lightning.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    e = config["eval"]
    return {split: evaluate_problems(model, tokenizer, paths.data / f"{split}.jsonl", eval_settings(config, seed),
                                     limit=e[f"{split}_problems"]) for split in ("test", "test_hard")}


def plan_runs(config: dict) -> list[Run]:
    """Every run of the study with its dependencies; seeds outermost, so an interrupted study holds whole seeds."""
    losses = ["ce", "dft", "aesl"] + (["aesl_anchored"] if config["sft"]["aesl_anchored"] is not None else [])
    runs = [Run("data", "data")]
    for seed in config["seeds"]:
        runs += [Run(f"sft/{loss}-s{seed}", "sft", {"loss": loss, "seed": seed}, ("data",)) for loss in losses]
        for arm in active_arms(config):
            deps = ("data",) if arm == "rl_only" else (f"sft/{SFT_LOSS_OF_ARM[arm]}-s{seed}",)
            runs.append(Run(f"start_eval/{arm}-s{seed}", "start_eval", {"arm": arm, "seed": seed}, deps))
            runs.append(Run(f"grpo/{arm}-s{seed}", "grpo", {"arm": arm, "seed": seed}, deps))
    first = config["seeds"][0]
    for step in config["sft"]["grid"]:  # the checkpoint sweep: the same GRPO budget from every grid snapshot of CE seed 0
        runs.append(Run(f"sweep/step{step:05d}", "sweep", {"step": step, "seed": first}, (f"sft/ce-s{first}",)))
    return runs


def execute(config: dict, paths: Paths, run: Run) -> dict:
    """Run one job and return its record (the caller writes it atomically)."""
    p = run.params
    if run.kind == "data":
        return make_data(config, paths)
    if run.kind == "sft":
        return run_sft(config, paths, run.id, p["loss"], p["seed"])
    if run.kind == "start_eval":
        start, step = starting_point(config, paths, p["arm"], p["seed"])
        return {"arm": p["arm"], "seed": p["seed"], "start": start, "sft_step": step, "eval": evaluate_model(config, paths, start, p["seed"])}
    if run.kind in ("grpo", "sweep"):
        if run.kind == "grpo":
            start, step = starting_point(config, paths, p["arm"], p["seed"])
            steps = config["grpo"]["steps"]
        else:
            step = p["step"]
            start = config["model"] if step == 0 else str(paths.run_dir(f"sft/ce-s{p['seed']}") / "snapshots" / f"step{step:05d}")
            steps = config["grpo"]["sweep_steps"]
        record = run_grpo_steps(config, paths, run.id, start, p["seed"], steps, export=True)
        record.update(arm=p.get("arm"), sft_step=step, eval=evaluate_model(config, paths, record["export"], p["seed"]))
        shutil.rmtree(Path(record["export"]), ignore_errors=True)  # weights are not needed once evaluated
        return record
    raise ValueError(f"unknown run kind {run.kind!r}")


def check_same_config(config: dict, paths: Paths) -> None:
    """Resume only under the configuration the finished runs were made with (recorded in `<out>/config.json`)."""
    recorded = paths.out / "config.json"
    if recorded.is_file() and read_json(recorded) != config:
        changed = sorted(k for k in config if read_json(recorded).get(k) != config[k])
        raise SystemExit(f"{recorded}: the finished runs were made with another configuration (changed: {', '.join(changed)}); "
                         "use another --out/--work, or delete both folders to start over")
    atomic_write_json(recorded, config)


def run_study(config: dict, paths: Paths, threads: int, only: str | None = None) -> None:
    """Every unfinished run in plan order (one at a time: the track is sized for 2 cores)."""
    quiet(threads)
    check_same_config(config, paths)
    ensure_data(config, paths)
    runs = plan_runs(config)
    done = {r.id for r in runs if paths.result(r.id).is_file()}
    for run in runs:
        if run.id in done or (only and not run.id.startswith(only)):
            continue
        missing = [d for d in run.deps if d not in done]
        if missing:
            raise RuntimeError(f"{run.id}: dependencies {missing} not finished")
        started = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {run.id}", flush=True)
        record = execute(config, paths, run)
        record.update(wall_seconds=time.perf_counter() - started, commit=cpu_track.commit(), load_after=machine_load())
        atomic_write_json(paths.result(run.id), record)
        done.add(run.id)


# ----------------------------------------------------------------------------------------------------
# Analysis (plan.md, "Analysis" and "Verdict rules"): pure functions of the run records

PRIMARY = ("test", "greedy_correct")  # the primary endpoint: greedy test accuracy after RL, per problem
DESIGN = {"discordance": 0.3, "seed_sd": 0.03}  # plan.md's assumptions for the design MDE


def outcome_matrix(records: list[dict], split: str = PRIMARY[0], field: str = PRIMARY[1]) -> tuple[list[list[float]], list[dict]]:
    """Seeds x problems outcomes of one arm (records sorted by seed), checked to be the same problems."""
    from aesl_lightning.study.stats import align

    records = sorted(records, key=lambda r: r["seed"])
    rows = [r["eval"][split]["rows"] for r in records]
    for other in rows[1:]:
        align(rows[0], other, key="id")
    return [[float(row[field]) for row in seed_rows] for seed_rows in rows], rows[0]


def compare(a: list[dict], b: list[dict], replicates: int = 2000) -> dict:
    """Arm a minus arm b on the primary endpoint, paired by seed and problem: interval, McNemar, seeds' signs,
    and the MDE of this comparison from its observed discordance and seed spread."""
    import numpy as np

    from aesl_lightning.study.stats import discordant_pairs, hierarchical_bootstrap, mcnemar_exact, minimum_detectable_effect, paired_differences, seed_signs

    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    ma, rows_a = outcome_matrix([r for r in a if r["seed"] in seeds])
    mb, rows_b = outcome_matrix([r for r in b if r["seed"] in seeds])
    from aesl_lightning.study.stats import align

    align(rows_a, rows_b, key="id")
    d = paired_differences(ma, mb)
    n10, n01 = discordant_pairs([int(x) for row in ma for x in row], [int(x) for row in mb for x in row])
    per_seed = [float(row.mean()) for row in d]
    seed_sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    discordance = (n10 + n01) / d.size
    return {"seeds": seeds, "difference": hierarchical_bootstrap(d, replicates, seed=0).as_dict(), "per_seed": per_seed,
            "signs": seed_signs(d), "n10": n10, "n01": n01, "mcnemar_p": mcnemar_exact(n10, n01),
            "per_seed_mcnemar_p": [mcnemar_exact(*discordant_pairs(x, y)) for x, y in zip(ma, mb)],
            "mde_observed": minimum_detectable_effect(len(seeds), d.shape[1], discordance, seed_sd) if seeds else float("nan"),
            "mde_design": minimum_detectable_effect(len(seeds), d.shape[1], DESIGN["discordance"], DESIGN["seed_sd"]) if seeds else float("nan")}


def rl_moved(grpo: list[dict], start: list[dict]) -> dict:
    """Manipulation check of one arm: the paired gain after - before RL on the primary endpoint, and the training
    reward's OLS slope per step and last-quarter minus first-quarter change (means over seeds). RL moved when
    the gain's interval lies above 0 or the reward change is at least 0.05 (plan.md)."""
    from aesl_lightning.study.stats import ols_slope

    gain = compare(grpo, start)
    slopes, changes = [], []
    for record in grpo:
        rewards = [row.get("train/reward/mean") for row in record["per_step"]]
        slopes.append(ols_slope(list(range(len(rewards))), rewards))
        q = max(1, len(rewards) // 4)
        changes.append(sum(rewards[-q:]) / q - sum(rewards[:q]) / q)
    change = sum(changes) / len(changes)
    return {"gain": gain, "reward_slope": sum(slopes) / len(slopes), "reward_change": change, "per_seed_reward_change": changes,
            "moved": gain["difference"]["low"] > 0 or change >= GRPO_MIN_GAIN}


def verdict(comparison: dict, mde: float) -> str:
    """supported: the interval lies above 0, McNemar p < 0.05 and every seed's mean difference is positive;
    refuted: the interval lies below 0, or its upper end is below the MDE (no effect of a detectable size in
    the claimed direction); inconclusive otherwise (plan.md, "Verdict rules")."""
    iv = comparison["difference"]
    if iv["low"] > 0 and comparison["mcnemar_p"] < 0.05 and all(s > 0 for s in comparison["signs"]):
        return "supported"
    if iv["high"] < 0 or iv["high"] < mde:
        return "refuted"
    return "inconclusive"


def c1_verdict(sft_records: list[dict]) -> dict:
    """C1: an interior diversity peak that the rule confirms (a fall after it) while validation accuracy has
    risen above step 0's, in a majority of CE seeds -> supported; the peak at step 0 or at the end in a majority
    -> refuted; otherwise inconclusive."""
    per_seed = []
    for record in sorted(sft_records, key=lambda r: r["seed"]):
        tp, history = record["turning_point"], record["history"]
        at_peak = next(row for row in history if row["step"] == tp["step"])
        learned = at_peak["val/greedy_accuracy"] > history[0]["val/greedy_accuracy"]
        per_seed.append({"seed": record["seed"], "peak_step": tp["step"], "fired": tp["fired"], "boundary": tp["boundary"],
                         "accuracy_at_peak": at_peak["val/greedy_accuracy"], "accuracy_step0": history[0]["val/greedy_accuracy"],
                         "interior": (not tp["boundary"]) and tp["fired"] and learned})
    majority = len(per_seed) // 2 + 1
    if sum(s["interior"] for s in per_seed) >= majority:
        outcome = "supported"
    elif sum(s["boundary"] for s in per_seed) >= majority:
        outcome = "refuted"
    else:
        outcome = "inconclusive"
    return {"verdict": outcome, "per_seed": per_seed}


def analyse(config: dict, paths: Paths) -> dict:
    """Every number of results.md from the finished run records (missing runs leave their rows out)."""
    def records(prefix: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for arm in active_arms(config):
            found = [read_json(paths.result(f"{prefix}/{arm}-s{seed}")) for seed in config["seeds"]
                     if paths.result(f"{prefix}/{arm}-s{seed}").is_file()]
            if found:
                out[arm] = found
        return out

    grpo, start = records("grpo"), records("start_eval")
    ce = [read_json(paths.result(f"sft/ce-s{seed}")) for seed in config["seeds"] if paths.result(f"sft/ce-s{seed}").is_file()]
    summary: dict[str, Any] = {"arms": {}, "manipulation": {}, "claims": {}}
    for arm, recs in grpo.items():
        summary["arms"][arm] = {split: {key: [r["eval"][split]["summary"].get(key) for r in recs]
                                        for key in ("greedy_accuracy", "pass@1", f"pass@{config['eval']['samples']}", "distinct_answers",
                                                    "pass@k_minus_pass@1", "greedy_boxed_rate")} for split in ("test", "test_hard")}
        summary["arms"][arm]["seeds"] = [r["seed"] for r in recs]
        summary["arms"][arm]["frac_reward_zero_std_first_quarter"] = [
            _mean([row.get("train/frac_reward_zero_std") for row in r["per_step"][: max(1, len(r["per_step"]) // 4)]]) for r in recs]
        if arm in start and len(start[arm]) == len(recs):
            summary["manipulation"][arm] = rl_moved(recs, start[arm])
    mde = minimum_design_mde(config)
    if ce:
        summary["claims"]["C1"] = c1_verdict(ce)
    if "ce_turning_point" in grpo and "ce_best_acc" in grpo:
        c2 = compare(grpo["ce_turning_point"], grpo["ce_best_acc"])
        moved = all(summary["manipulation"].get(a, {}).get("moved") for a in ("ce_turning_point", "ce_best_acc"))
        c2["verdict"] = verdict(c2, mde) if moved else "inconclusive (RL did not move: uninformative)"
        summary["claims"]["C2"] = c2
    if "aesl" in grpo:
        c3 = {}
        for other in ("rl_only", "ce_best_acc", "dft", "ce_end"):
            if other in grpo:
                c3[other] = compare(grpo["aesl"], grpo[other])
                moved = all(summary["manipulation"].get(a, {}).get("moved") for a in ("aesl", other))
                c3[other]["verdict"] = verdict(c3[other], mde) if moved else "inconclusive (RL did not move: uninformative)"
        primary = [c3[o]["verdict"] for o in ("rl_only", "ce_best_acc", "dft") if o in c3]
        overall = ("supported" if primary and all(v == "supported" for v in primary) and len(primary) == 3 else
                   "refuted" if any(v == "refuted" for v in primary) else "inconclusive")
        summary["claims"]["C3"] = {"comparisons": c3, "verdict": overall}
    summary["design_mde"] = mde
    summary["curves"] = {str(r["seed"]): [{k: v for k, v in row.items() if k != "val/correct_by_problem"} for row in r["history"]]
                         for r in ce}
    summary["turning_points"] = {str(r["seed"]): r["turning_point"]["step"] for r in ce}
    summary["best_accuracy_steps"] = {str(r["seed"]): r["best_accuracy_step"] for r in ce}
    summary["before_rl"] = {arm: {"greedy_accuracy": [r["eval"]["test"]["summary"]["greedy_accuracy"] for r in recs],
                                  "distinct_answers": [r["eval"]["test"]["summary"].get("distinct_answers") for r in recs],
                                  "pass@k_minus_pass@1": [r["eval"]["test"]["summary"].get("pass@k_minus_pass@1") for r in recs]}
                            for arm, recs in start.items()}
    summary["sweep"] = sweep_summary(config, paths, ce)
    return summary


SWEEP_PREDICTORS = ("val/greedy_accuracy", "val/entropy", "val/self_bleu", "val/distinct_answers", "val/pass@k_minus_pass@1")


def sweep_summary(config: dict, paths: Paths, ce: list[dict]) -> dict:
    """Post-RL test accuracy of every finished sweep run beside its snapshot's validation row, and the Spearman
    correlation of each SFT predictor with it (exploratory: one seed)."""
    first = config["seeds"][0]
    history = next((r["history"] for r in ce if r["seed"] == first), [])
    points = []
    for row in history:
        path = paths.result(f"sweep/step{row['step']:05d}")
        if path.is_file():
            post = read_json(path)["eval"]["test"]["summary"]
            points.append({"step": row["step"], **{k: row.get(k) for k in SWEEP_PREDICTORS}, "post_rl_greedy": post["greedy_accuracy"],
                           "post_rl_pass@1": post.get("pass@1")})
    correlations = {}
    if len(points) >= 3:
        for key in SWEEP_PREDICTORS:
            pairs = [(p[key], p["post_rl_greedy"]) for p in points if p[key] is not None]
            correlations[key] = cpu_track.spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else float("nan")
    return {"points": points, "spearman_with_post_rl_greedy": correlations}


CURVE_COLUMNS = (("val/greedy_accuracy", "val acc"), ("val/greedy_boxed_rate", "boxed"), ("val/entropy", "entropy"),
                 ("val/self_bleu", "self-BLEU"), ("val/distinct_answers", "distinct answers"), ("val/pass@k_minus_pass@1", "pass@k - pass@1"),
                 ("val/zero_variance_share", "zero-variance share"), ("val/sample_tokens", "tokens"))


def write_curve_figure(summary: dict, out: Path) -> None:
    """diversity_curve.png: each grid measure against step (log scale, step 0 drawn at 0.5), one line per seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6))
    for i, (key, label) in enumerate(CURVE_COLUMNS):
        ax = fig.add_subplot(2, 4, i + 1)
        for seed, rows in summary["curves"].items():
            xs = [max(r["step"], 0.5) for r in rows]
            ax.plot(xs, [r.get(key, float("nan")) for r in rows], marker="o", markersize=3, label=f"seed {seed}")
            tp = summary["turning_points"][seed]
            ax.axvline(max(tp, 0.5), linestyle="--", linewidth=0.8, color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("SFT step (0 drawn at 0.5)", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("CE cold start on the validation grid (dashed: turning point of each seed)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def minimum_design_mde(config: dict) -> float:
    from aesl_lightning.study.stats import minimum_detectable_effect

    return minimum_detectable_effect(len(config["seeds"]), config["eval"]["test_problems"], DESIGN["discordance"], DESIGN["seed_sd"])


def _mean(values: list) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def write_results(config: dict, paths: Paths, command: str) -> Path:
    """results.md and results.json from the finished runs (the verdicts as measured, whichever way they fall)."""
    summary = analyse(config, paths)
    atomic_write_json(paths.out / "results.json", {"summary": summary, "command": command, "machine": cpu_track.machine(),
                                                   "commit": cpu_track.commit()})
    k = config["eval"]["samples"]
    lines = ["# Real-model track: results", "", f"Command: `{command}`  ", f"Machine: {cpu_track.machine()}  ",
             f"Commit: {cpu_track.commit()}; design: plan.md; pre-flight: preflight.md", "",
             "## Arms after RL (test split, mean over seeds)", "",
             f"| arm | seeds | greedy acc | pass@1 | pass@{k} | pass@{k} - pass@1 | distinct answers | hard greedy acc | zero-variance groups (RL, first quarter) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, entry in summary["arms"].items():
        t, h = entry["test"], entry["test_hard"]
        lines.append(f"| {ARM_LABELS[arm]} | {len(entry['seeds'])} | {_f(_mean(t['greedy_accuracy']))} | {_f(_mean(t['pass@1']))} | "
                     f"{_f(_mean(t[f'pass@{k}']))} | {_f(_mean(t['pass@k_minus_pass@1']))} | {_f(_mean(t['distinct_answers']), 2)} | "
                     f"{_f(_mean(h['greedy_accuracy']))} | {_f(_mean(entry['frac_reward_zero_std_first_quarter']), 2)} |")
    lines += ["", "## Manipulation check (RL gain on the primary endpoint, paired; training reward)", "",
              "| arm | gain [95% interval] | reward slope / step | reward change (last - first quarter) | RL moved |", "|---|---|---|---|---|"]
    for arm, m in summary["manipulation"].items():
        iv = m["gain"]["difference"]
        lines.append(f"| {ARM_LABELS[arm]} | {iv['estimate']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}] | {_f(m['reward_slope'], 4)} | "
                     f"{m['reward_change']:+.3f} | {'yes' if m['moved'] else 'NO'} |")
    preflight_file = paths.out / "preflight.json"
    if preflight_file.is_file():
        rules = read_json(preflight_file)["go_no_go"]
        lines[6:6] = ["## Pre-flight (preflight.md)", ""] + [
            f"- {r['rule']}: {_f(r['value'])}: {'not measured' if r['passes'] is None else 'pass' if r['passes'] else 'FAIL'}" for r in rules] + [""]
    if summary["before_rl"]:
        lines += ["", "## Starting points before RL (test split, mean over seeds)", "", "| arm | greedy acc | distinct answers | pass@k - pass@1 |",
                  "|---|---|---|---|"]
        for arm, b in summary["before_rl"].items():
            lines.append(f"| {ARM_LABELS[arm]} | {_f(_mean(b['greedy_accuracy']))} | {_f(_mean(b['distinct_answers']), 2)} | "
                         f"{_f(_mean(b['pass@k_minus_pass@1']))} |")
    for seed, rows in summary["curves"].items():
        lines += ["", f"## CE validation grid, seed {seed} (turning point: step {summary['turning_points'][seed]}, best accuracy: step "
                  f"{summary['best_accuracy_steps'][seed]})", "", "| step | " + " | ".join(label for _, label in CURVE_COLUMNS) + " |",
                  "|---" * (len(CURVE_COLUMNS) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(_f(r.get(key)) for key, _ in CURVE_COLUMNS) + " |" for r in rows]
    if summary["curves"]:
        write_curve_figure(summary, paths.out / "diversity_curve.png")
        lines += ["", "Figure: `diversity_curve.png`."]
    sweep = summary["sweep"]
    if sweep["points"]:
        lines += ["", f"## Checkpoint sweep (CE seed {config['seeds'][0]}, {config['grpo']['sweep_steps']} GRPO steps from each grid snapshot; "
                  "exploratory)", "", "| step | val acc | entropy | self-BLEU | distinct answers | pass@k - pass@1 | post-RL greedy | post-RL pass@1 |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['step']} | " + " | ".join(_f(p[k]) for k in SWEEP_PREDICTORS) + f" | {_f(p['post_rl_greedy'])} | {_f(p['post_rl_pass@1'])} |"
                  for p in sweep["points"]]
        if sweep["spearman_with_post_rl_greedy"]:
            lines += ["", "Spearman correlation with post-RL greedy accuracy: " + ", ".join(
                f"{k.removeprefix('val/')} {v:+.2f}" for k, v in sweep["spearman_with_post_rl_greedy"].items())]
    lines += ["", f"## Verdicts (design MDE {summary['design_mde']:.3f})", ""]
    claims = summary["claims"]
    if "C1" in claims:
        c1 = claims["C1"]
        lines.append(f"- **C1 (a diversity turning point exists in cold-start SFT): {c1['verdict']}**; per seed: " + "; ".join(
            f"seed {s['seed']}: peak at step {s['peak_step']} ({'interior' if s['interior'] else 'boundary' if s['boundary'] else 'not confirmed'}, "
            f"val acc {s['accuracy_step0']:.3f} -> {s['accuracy_at_peak']:.3f})" for s in c1["per_seed"]))
    for name, label, comparison in (("C2", "turning point minus best accuracy, after identical RL", claims.get("C2")),) + tuple(
            ("C3", f"AESL minus {ARM_LABELS[o]}", c) for o, c in claims.get("C3", {}).get("comparisons", {}).items()):
        if comparison:
            iv = comparison["difference"]
            lines.append(f"- **{name} ({label}): {comparison['verdict']}**: {iv['estimate']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}] "
                         f"(hierarchical bootstrap), McNemar p = {comparison['mcnemar_p']:.3g} ({comparison['n10']} vs {comparison['n01']} "
                         f"discordant), seeds' signs {comparison['signs']}, MDE observed {comparison['mde_observed']:.3f}")
    if "C3" in claims:
        lines.append(f"- **C3 overall (AESL + RL beats RL only, CE + RL and DFT + RL): {claims['C3']['verdict']}**")
    out = paths.out / "results.md"
    out.write_text("\n".join(lines) + "\n")
    return out


# Go/no-go rules of plan.md, section "Pre-flight": (name, test on the records, what it says)
BASE_BOXED_MAX = 0.20
BASE_ACCURACY_RANGE = (0.02, 0.50)
GRPO_MIN_GAIN = 0.05


def go_no_go(records: dict, budget: dict | None = None) -> list[dict]:
    """Each pre-flight rule with its measured number and pass / fail / not measured (`budget`: projected_seconds)."""
    rules = []
    base = records.get("preflight/base")
    if base:
        s = base["test"]["summary"]
        rules.append({"rule": f"base greedy boxed rate <= {BASE_BOXED_MAX}", "value": s["greedy_boxed_rate"],
                      "passes": s["greedy_boxed_rate"] <= BASE_BOXED_MAX})
        low, high = BASE_ACCURACY_RANGE
        rules.append({"rule": f"{low} < base greedy accuracy < {high}", "value": s["greedy_accuracy"],
                      "passes": low < s["greedy_accuracy"] < high})
    else:
        rules += [{"rule": "base measured", "value": None, "passes": None}]
    check = records.get("preflight/grpo_check")
    rules.append({"rule": f"10 GRPO steps from a CE checkpoint raise the training reward by >= {GRPO_MIN_GAIN} (last half - first half)",
                  "value": check["reward_gain_halves"] if check else None, "passes": check["passes"] if check else None})
    timed = all(k in records for k in ("preflight/sft_timing_full", "preflight/sft_timing_lora")) and base is not None
    rules.append({"rule": "SFT step time and sampling throughput measured", "value": None, "passes": timed})
    if budget is not None:
        hours = budget["total"] / 3600
        rules.append({"rule": f"projected wall time of --run (hours) <= {BUDGET_HOURS} x 1.1 on this machine", "value": hours,
                      "passes": hours <= BUDGET_HOURS * 1.1})
    return rules


BUDGET_HOURS = 3.0


def measured_costs(config: dict, paths: Paths, records: dict) -> dict | None:
    """Unit costs for `projected_seconds` from the pre-flight records (None until base and SFT timing exist);
    the completion length after SFT is the cold-start solutions' mean token count (+ EOS)."""
    from aesl_lightning.data.synthetic import read_jsonl
    from aesl_lightning.models import load_tokenizer

    base, full = records.get("preflight/base"), records.get("preflight/sft_timing_full")
    if not base or not full:
        return None
    tokenizer = load_tokenizer(config["model"])
    completions = [r["completion"] for r in read_jsonl(paths.data / "coldstart.jsonl")]
    tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions) / len(completions)
    t = base["test"]["timing"]
    check = records.get("preflight/grpo_check")
    return {"sft_step": full["median_after_first"], "greedy_tps": t["greedy_tokens_per_second"], "sample_tps": t["sample_tokens_per_second"],
            "tokens": tokens, "base_tokens": base["test"]["summary"]["greedy_tokens"],
            "grpo_step": check["median_step_seconds"] if check else None}


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_preflight_report(config: dict, paths: Paths, records: dict, command: str) -> Path:
    """`<out>/preflight.md` and `preflight.json`: the measured numbers, the go/no-go table and the projected
    budget, followed by `<out>/preflight_notes.md` (hand-written) when it exists."""
    lines = ["# Pre-flight (generated by `experiments/track_real.py --preflight`; rules in plan.md)", "", f"Command: `{command}`  ",
             f"Machine: {cpu_track.machine()}", ""]
    base = records.get("preflight/base")
    if base:
        lines += [f"Base model `{config['model']}`, recorded {base['finished']} at commit {base['commit']}, {base['threads']} torch threads, "
                  f"{base['wall_seconds'] / 60:.1f} min; load before: {base['load_before']}; after: {base['load_after']}", "",
                  "| split | problems | greedy accuracy | greedy boxed rate | pass@1 | pass@k | pass@k - pass@1 | distinct answers (of k) "
                  "| sample boxed rate | zero-variance share | self-BLEU | entropy | greedy tokens | sample tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for split in ("test", "test_hard"):
            s = base[split]["summary"]
            k = s.get("k")
            lines.append(f"| {split} | {s['problems']} | {_f(s['greedy_accuracy'])} | {_f(s['greedy_boxed_rate'])} | {_f(s.get('pass@1'))} | "
                         f"{_f(s.get(f'pass@{k}'))} (k={k}) | {_f(s.get('pass@k_minus_pass@1'))} | {_f(s.get('distinct_answers'), 2)} | "
                         f"{_f(s.get('sample_boxed_rate'))} | {_f(s.get('zero_variance_share'))} | {_f(s.get('self_bleu'))} | "
                         f"{_f(s.get('entropy'))} | {_f(s['greedy_tokens'], 1)} | {_f(s.get('sample_tokens'), 1)} |")
        t = base["test"]["timing"]
        lines += ["", f"Throughput (test split, batch {config['eval']['batch_size']} prompts): greedy {_f(t['greedy_tokens_per_second'], 1)} "
                  f"tokens/s ({t['greedy_tokens']} tokens in {_f(t['greedy_seconds'], 1)} s); sampling k={config['eval']['samples']}: "
                  f"{_f(t['sample_tokens_per_second'], 1)} tokens/s ({t['sample_tokens']} tokens in {_f(t['sample_seconds'], 1)} s).", ""]
    for kind in ("full", "lora"):
        r = records.get(f"preflight/sft_timing_{kind}")
        if r:
            label = kind if kind == "full" else f"LoRA r={r['lora_rank']}"
            lines.append(f"SFT step ({label}, batch {r['batch_size']}): median "
                         f"{_f(r['median_after_first'], 2)} s after the first (steps: {', '.join(f'{x:.2f}' for x in r['step_seconds'])}); "
                         f"load before: {r['load_before']}")
    check = records.get("preflight/grpo_check")
    if check:
        rewards = [row.get("train/reward/mean") for row in check["per_step"]]
        lines += ["", f"GRPO check: {check['steps']} steps, median {_f(check['median_step_seconds'], 1)} s/step; training reward per step "
                  f"{', '.join(_f(r, 2) for r in rewards)}; gain (last half - first half) {_f(check['reward_gain_halves'])}, "
                  f"OLS slope {_f(check['reward_slope_per_step'], 4)}/step."]
    costs = measured_costs(config, paths, records)
    budget = projected_seconds(config, costs) if costs else None
    if budget:
        lines += ["", f"Projected wall time of `--run` at this configuration from these unit costs (`projected_seconds`; completion length "
                  f"after SFT {costs['tokens']:.1f} tokens, GRPO step {budget['grpo_step_used']:.1f} s"
                  f"{' measured' if costs['grpo_step'] else ' estimated (no GRPO check yet)'}): SFT {budget['sft'] / 3600:.2f} h, "
                  f"evaluation before RL {budget['start_eval'] / 3600:.2f} h, GRPO + evaluation {budget['grpo'] / 3600:.2f} h, "
                  f"checkpoint sweep {budget['sweep'] / 3600:.2f} h: **total {budget['total'] / 3600:.1f} h**."]
        if budget["total"] / 3600 > BUDGET_HOURS * 1.1:
            ladder = shrink_ladder(config, costs)
            fits = next((label for label, hours in ladder if hours <= BUDGET_HOURS * 1.1), None)
            lines += ["", "Rule 5 shrink order (plan.md), cumulative: " + "; ".join(f"{label}: {hours:.1f} h" for label, hours in ladder)
                      + (f". Fits after {fits}." if fits else f". **Does not fit {BUDGET_HOURS} h x 1.1 after every cut: the CPU run "
                                                             "is infeasible (rule 5); the study runs at GPU size.**")]
    lines += ["", "## Go / no-go (rules of plan.md)", "", "| rule | measured | outcome |", "|---|---|---|"]
    rules = go_no_go(records, budget)
    for r in rules:
        outcome = "not measured yet" if r["passes"] is None else ("pass" if r["passes"] else "FAIL")
        lines.append(f"| {r['rule']} | {_f(r['value'])} | {outcome} |")
    slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("test", "test_hard")} | (
        {split: {"summary": v[split]["summary"], "timing": v[split]["timing"]} for split in ("test", "test_hard")} if "test" in v else {})
        for k, v in records.items()}
    atomic_write_json(paths.out / "preflight.json", {"records": slim, "go_no_go": rules, "costs": costs, "budget": budget, "command": command})
    notes = paths.out / "preflight_notes.md"
    if notes.is_file():  # the engineer's reading of these numbers (hand-written), kept under the generated part
        lines += ["", notes.read_text().rstrip()]
    out = paths.out / "preflight.md"
    out.write_text("\n".join(lines) + "\n")
    return out


SHRINK_ORDER = (
    ("(a) test problems 256 -> 128", lambda c: c["eval"].update(test_problems=min(c["eval"]["test_problems"], 128))),
    ("(b) hard test problems 128 -> 64", lambda c: c["eval"].update(test_hard_problems=min(c["eval"]["test_hard_problems"], 64))),
    ("(c) grid validation problems 64 -> 32", lambda c: c["eval"].update(val_problems=min(c["eval"]["val_problems"], 32))),
    ("(d) checkpoint sweep on every other grid point", lambda c: c.update(sweep_grid=c["sft"]["grid"][::2])),
    ("(e) GRPO steps 40 -> 30", lambda c: c["grpo"].update(steps=min(c["grpo"]["steps"], 30))),
    ("(f) checkpoint sweep dropped", lambda c: c.update(sweep_grid=[])),
)
"""plan.md rule 5: the cuts applied, cumulatively and in this order, until the projected wall time fits."""


def shrink_ladder(config: dict, costs: dict) -> list[tuple[str, float]]:
    """(step, projected hours) after each cut of `SHRINK_ORDER`, applied cumulatively to a copy of `config`."""
    import copy

    shrunk, ladder = copy.deepcopy(config), []
    for label, cut in SHRINK_ORDER:
        cut(shrunk)
        ladder.append((label, projected_seconds(shrunk, costs)["total"] / 3600))
    return ladder


def eval_seconds(problems: int, k: int, tokens: float, costs: dict) -> float:
    """Seconds to evaluate `problems` prompts: one greedy and k sampled completions of `tokens` tokens each."""
    return problems * tokens * (1 / costs["greedy_tps"] + k / costs["sample_tps"])


def projected_seconds(config: dict, costs: dict) -> dict:
    """The study's wall time on this machine from measured unit costs (plan.md, "Budget").

    costs: `sft_step` (s per SFT step), `grpo_step` (s per GRPO step; if absent: the rollout's sampling at
    `sample_tps` plus a backward over its tokens at the SFT step's per-sequence cost, x 1.5 for the longer
    sequences), `greedy_tps` and `sample_tps` (generated tokens per second in evaluation batches),
    `tokens` (completion length after SFT) and `base_tokens` (the base model's).
    """
    e, g, sft = config["eval"], config["grpo"], config["sft"]
    k, tok = e["samples"], costs["tokens"]
    grpo_step = costs.get("grpo_step") or (g["prompts"] * g["num_generations"] * tok / costs["sample_tps"]
                                           + 1.5 * costs["sft_step"] * g["prompts"] * g["num_generations"] / sft["batch_size"])
    seeds, arms = len(config["seeds"]), len(active_arms(config))
    losses = 3 + (config["sft"]["aesl_anchored"] is not None)
    test_eval = eval_seconds(e["test_problems"], k, tok, costs) + eval_seconds(e["test_hard_problems"], k, tok * 1.3, costs)
    parts = {
        "sft": seeds * losses * (sft["max_steps"] * costs["sft_step"] + len(sft["grid"]) * eval_seconds(e["val_problems"], k, tok, costs)),
        "start_eval": seeds * arms * test_eval,
        "grpo": seeds * arms * (g["steps"] * grpo_step + test_eval),
        "sweep": len(config.get("sweep_grid", sft["grid"])) * (g["sweep_steps"] * grpo_step + eval_seconds(e["test_problems"], k, tok, costs)),
    }
    parts["grpo_step_used"] = grpo_step
    parts["total"] = parts["sft"] + parts["start_eval"] + parts["grpo"] + parts["sweep"]
    return parts


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="track configuration (default: %(default)s)")
    parser.add_argument("--preflight", action="store_true", help="data, base measurement and step timings (preflight.md)")
    parser.add_argument("--grpo-check", action="store_true", help="with --preflight: 10 GRPO steps from a CE checkpoint (slow on CPU)")
    parser.add_argument("--run", action="store_true", help="the pre-registered study (resumes finished runs)")
    parser.add_argument("--report", action="store_true", help="write results.md / results.json from the finished runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="data, weights and logs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.preflight or args.run or args.report):
        parser.error("choose --preflight, --run or --report")
    config = load_config(args.config)
    paths = Paths(args.out, args.work)
    command = "python experiments/track_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.preflight:
        records = preflight(config, paths, args.grpo_check, args.threads)
        print(f"wrote {write_preflight_report(config, paths, records, command)}")
    if args.run:
        run_study(config, paths, args.threads)
    if args.run or args.report:
        print(f"wrote {write_results(config, paths, command)}")


if __name__ == "__main__":
    main()
