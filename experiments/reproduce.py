"""Reproduce the paper's question end to end: is a diversity-aware cold start a better starting point for RL?

    python experiments/reproduce.py --track cpu            # the whole CPU table (resumes finished runs)
    python experiments/reproduce.py --track cpu --smoke    # the same pipeline, tiny sizes, ~2 minutes
    python experiments/reproduce.py --track gpu            # SmolLM2-135M-Instruct, sized for one GPU
    python experiments/reproduce.py --track cpu --ablation # set size x difficulty, CE vs AESL (ablation.md)

Pipeline (every stage is the toolkit itself: SFTModule, DiversityEarlyStopping, GRPOModule):

1. data: disjoint JSONL splits of the arithmetic task: a broad pre-training corpus (three prompt phrasings
   x three solution styles), a small cold-start set in one reasoning format, an SFT validation split, RL
   prompts, an in-distribution test split and a harder test split (more operations, bigger numbers).
2. base (CPU track): a few-million-parameter Llama-style model pre-trained from scratch on the corpus, so
   that it has a broad prior over solution styles before the cold start. The GPU track starts from
   SmolLM2-135M-Instruct instead.
3. SFT arms per seed: CE (one run gives three starting points: best validation answer accuracy, the end
   of training, and the diversity turning point chosen by DiversityEarlyStopping), DFT, and AESL with its
   thresholds chosen on the validation split by a small sweep (seed 0).
4. GRPO from every starting point (and from the base model), same budget, then evaluation on both test
   splits: greedy accuracy, pass@1 (mean over k samples) and pass@k (unbiased estimator).
5. Checkpoint sweep: GRPO from every validation snapshot of the seed-0 CE run; post-RL accuracy against
   the snapshot's SFT accuracy and SFT diversity, with Spearman rank correlations.
6. Report: `<out>/results.md`, `<out>/results.json`, figures, and the command, seeds, machine, wall time.

Each finished run writes `<out>/runs/<run id>.json` atomically; a rerun skips those, so an interrupted
track resumes. Runs go to a pool of worker processes (`--workers`), each with `--threads` torch threads.
Weights, logs and exports live under `--work` (git-ignored `lightning_logs/reproduce/<track>` by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/reproduce.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Task:
    """The arithmetic task family (see aesl_lightning.data.synthetic.ArithmeticConfig)."""

    min_digits: int = 1
    max_digits: int = 1
    mul_max_digits: int = 1
    min_steps: int = 1
    max_steps: int = 2
    phrasings: tuple[str, ...] = ("expression", "instructions")

    def config(self, **overrides):
        from aesl_lightning.data.synthetic import ArithmeticConfig

        fields = dataclasses.asdict(self)
        fields.update(overrides)
        return ArithmeticConfig(**fields)


@dataclass(frozen=True)
class Track:
    """Every size and hyper-parameter of one track; `smoke()` shrinks it to a few steps."""

    name: str
    base_model: str | None = None  # None: pre-train one from scratch (CPU track)
    # the from-scratch base model (Llama architecture, character tokenizer)
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    # data
    task: Task = Task()  # cold start, RL, validation and the in-distribution test: one-digit operands, 1-2 operations
    hard_task: Task = Task(min_steps=3, max_steps=3)  # the harder test: 3 operations (never seen, not even in pre-training)
    pretrain_task: Task = Task(max_digits=2)  # broader numbers than the task, 1-2 operations, all three solution styles
    coldstart_style: str = "verbose"
    num_pretrain: int = 20000
    num_coldstart: int = 100
    num_val: int = 64
    num_rl: int = 512
    num_test: int = 128
    num_test_hard: int = 128
    # pre-training
    pretrain_steps: int = 2000
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    # cold-start SFT
    sft_epochs: int = 32
    sft_lr: float = 5e-4
    sft_batch: int = 16
    val_every_epochs: int = 2
    val_prompts: int = 64
    val_samples: int = 4
    max_new_tokens: int = 144
    aesl_taus: tuple[float, ...] = (0.7, 0.9, 0.97)
    turning_point_patience: int = 3
    lora_rank: int | None = None
    # GRPO
    grpo_steps: int = 30
    grpo_prompts: int = 16
    num_generations: int = 8
    grpo_lr: float = 5e-5
    beta: float = 0.0
    # evaluation after RL
    eval_samples: int = 8
    # checkpoint sweep (GRPO from each validation snapshot of the seed-0 CE run)
    sweep_grpo_steps: int = 20
    sweep_every: int = 2  # every n-th snapshot
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 1234

    def smoke(self) -> Track:
        """Every stage for a step or two on tiny sets; a real base model (GPU track) gets one seed and one AESL
        threshold so that the smoke run stays within minutes on a CPU."""
        real = self.base_model is not None
        return replace(
            self,
            name=f"{self.name}-smoke",
            hidden_size=min(self.hidden_size, 32), num_layers=min(self.num_layers, 2), intermediate_size=64,
            num_pretrain=64, num_coldstart=16, num_val=8, num_rl=16, num_test=8, num_test_hard=8,
            pretrain_steps=4, sft_epochs=4, sft_batch=8, val_prompts=4, val_samples=2, max_new_tokens=24,
            aesl_taus=self.aesl_taus[: 1 if real else 2], grpo_steps=2, grpo_prompts=2, num_generations=2, eval_samples=2,
            sweep_grpo_steps=1, sweep_every=2 if real else 1, seeds=self.seeds[: 1 if real else 2],
            val_every_epochs=2,
        )


TRACKS = {
    "cpu": Track(name="cpu"),
    # SmolLM2-135M-Instruct already has a broad prior; no pre-training. Sized for one 80 GB GPU (or FSDP:
    # see the README); `--smoke` runs it for a few steps on CPU.
    "gpu": Track(
        name="gpu", base_model="smollm2-135m-instruct", task=Task(max_digits=3, mul_max_digits=2, max_steps=3,
        phrasings=("word", "expression", "instructions")), hard_task=Task(max_digits=3, mul_max_digits=2, min_steps=4, max_steps=5,
        phrasings=("word", "expression", "instructions")), num_coldstart=128, num_rl=2048, num_test=500, num_test_hard=500,
        sft_epochs=12, sft_lr=2e-5, sft_batch=16, val_every_epochs=1, val_prompts=64, val_samples=8, max_new_tokens=256,
        grpo_steps=200, grpo_prompts=32, num_generations=8, grpo_lr=1e-6, beta=0.04, eval_samples=16, sweep_grpo_steps=100,
    ),
}


# ----------------------------------------------------------------------------------------------------
# Runs: small JSON-described jobs with dependencies


@dataclass
class Run:
    id: str
    kind: str  # data | base | sft | grpo
    params: dict[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class Paths:
    def __init__(self, out: Path, work: Path) -> None:
        self.out, self.work = out, work
        self.runs = out / "runs"
        self.data = work / "data"
        self.base = work / "base" / "hf_model"
        self.base_copy = out / "base_model"  # the pre-trained weights kept with the results (a few MB): runs resume anywhere

    def result(self, run_id: str) -> Path:
        return self.runs / f"{run_id.replace('/', '__')}.json"

    def run_dir(self, run_id: str) -> Path:
        return self.work / run_id


# ----------------------------------------------------------------------------------------------------
# Stage 1: data


def make_data(track: Track, paths: Paths) -> dict:
    from aesl_lightning.data.synthetic import (
        SOLUTION_STYLES,
        generate_arithmetic,
        write_jsonl,
    )

    seed = track.data_seed
    specs = [  # (split, config): each split excludes every earlier one (no shared prompt or expression)
        ("coldstart", track.task.config(num_examples=track.num_coldstart, seed=seed + 1, solution_styles=(track.coldstart_style,))),
        ("val", track.task.config(num_examples=track.num_val, seed=seed + 2, solution_styles=(track.coldstart_style,))),
        ("test", track.task.config(num_examples=track.num_test, seed=seed + 3, solution_styles=(track.coldstart_style,))),
        ("test_hard", track.hard_task.config(num_examples=track.num_test_hard, seed=seed + 4, solution_styles=(track.coldstart_style,))),
        ("rl", track.task.config(num_examples=track.num_rl, seed=seed + 5, solution_styles=(track.coldstart_style,))),
        ("pretrain", track.pretrain_task.config(num_examples=track.num_pretrain, seed=seed + 6, solution_styles=SOLUTION_STYLES)),
        ("pretrain_val", track.pretrain_task.config(num_examples=64, seed=seed + 7, solution_styles=SOLUTION_STYLES)),
    ]
    earlier: list[dict] = []
    sizes = {}
    for name, config in specs:
        if name == "pretrain" and track.base_model is not None:
            continue
        records = generate_arithmetic(config, exclude=earlier)
        write_jsonl(records, paths.data / f"{name}.jsonl")
        earlier += records
        sizes[name] = len(records)
    return {"sizes": sizes, "coldstart_style": track.coldstart_style, "sha256": data_digests(paths, sizes)}


def data_digests(paths: Paths, names) -> dict[str, str]:
    return {name: hashlib.sha256((paths.data / f"{name}.jsonl").read_bytes()).hexdigest() for name in names}


def restore_shared_inputs(track: Track, paths: Paths) -> None:
    """A track whose results are committed but whose work folder is gone (a fresh clone) gets back what later runs
    read: the data splits, regenerated (seeded) and checked against the recorded digests, and the pre-trained base
    model, copied from `<out>/base_model`. Without that copy the base cannot be restored; say so, never pre-train a
    different base under finished runs."""
    if paths.result("data").is_file():
        record = read_json(paths.result("data"))
        if not all((paths.data / f"{name}.jsonl").is_file() for name in record["sizes"]):
            regenerated = make_data(track, paths)
            for key in ("sizes", "sha256"):
                if key in record and regenerated[key] != record[key]:
                    raise SystemExit(f"{paths.result('data')}: the regenerated data splits differ from the recorded ones ({key}); "
                                     "the generator changed since these runs were made: use another --out/--work")
    if track.base_model is None and paths.result("base").is_file() and not (paths.base / "config.json").is_file():
        if not (paths.base_copy / "config.json").is_file():
            raise SystemExit(f"{paths.result('base')} records a pre-trained base model, but neither {paths.base} nor "
                             f"{paths.base_copy} holds its weights; delete that file to pre-train again (runs already "
                             "finished were made from the old base)")
        shutil.copytree(paths.base_copy, paths.base)


# ----------------------------------------------------------------------------------------------------
# Lightning plumbing shared by the stages


def _trainer(run_dir: Path, name: str, **kwargs):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="gpu" if _use_gpu() else "cpu", devices=1, precision="bf16-mixed" if _use_gpu() else "32-true",
        logger=TensorBoardLogger(save_dir=str(run_dir), name=name, version=""),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        inference_mode=False,  # as the committed results were made (no numerical effect; CausalLMModule now resets metrics at fit start)
        **kwargs,
    )


def _use_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class History(Callback):
    """The logged validation metrics at every validation (step = the checkpoint's global step), and optionally a
    Hugging Face snapshot of the model at each."""

    def __init__(self, snapshot_dir: Path | None = None) -> None:
        self.rows: list[dict] = []
        self.snapshot_dir = snapshot_dir

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self.rows.append(row)
        if self.snapshot_dir is not None:
            pl_module.export_hf(self.snapshot_dir / f"step{trainer.global_step:05d}")


def _val_generation(track: Track):
    from aesl_lightning.sft import ValidationGeneration

    return ValidationGeneration(num_prompts=track.val_prompts, max_new_tokens=track.max_new_tokens, num_samples=track.val_samples,
                                temperature=1.0, batch_size=min(track.val_prompts, 64), num_text_samples=2, kl_to_base=True)


# ----------------------------------------------------------------------------------------------------
# Stage 2: the base model


def make_base(track: Track, paths: Paths, seed: int = 0) -> dict:
    """Pre-train a small Llama-style model from scratch on the broad corpus (CE on completions)."""
    import lightning as L

    from aesl_lightning import SFTDataModule, SFTModule
    from aesl_lightning.losses import LossConfig
    from aesl_lightning.sft import ValidationGeneration
    from aesl_lightning.tiny import char_tokenizer, tiny_model

    run_dir = paths.run_dir("base")
    init = run_dir / "init"
    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer), hidden_size=track.hidden_size, num_layers=track.num_layers,
                       intermediate_size=track.intermediate_size, num_heads=track.num_heads, num_kv_heads=track.num_kv_heads)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    L.seed_everything(seed, workers=True, verbose=False)
    module = SFTModule(name_or_path=str(init), loss=LossConfig(name="ce"), lr=track.pretrain_lr, warmup_steps=0.05, scheduler="cosine",
                       weight_decay=0.01, histogram_every_n_steps=0,
                       val_generation=ValidationGeneration(num_prompts=64, num_samples=0, max_new_tokens=track.max_new_tokens, batch_size=64,
                                                           kl_to_base=False))  # greedy answer accuracy of the base
    data = SFTDataModule(train=str(paths.data / "pretrain.jsonl"), val=str(paths.data / "pretrain_val.jsonl"),
                         batch_size=track.pretrain_batch, max_length=512, seed=seed)
    history = History()
    trainer = _trainer(run_dir, "logs", max_steps=track.pretrain_steps, gradient_clip_val=1.0, enable_checkpointing=False,
                       num_sanity_val_steps=0, val_check_interval=min(250, track.pretrain_steps), check_val_every_n_epoch=None,
                       callbacks=[history])
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    module.export_hf(paths.base)
    shutil.copytree(paths.base, paths.base_copy, dirs_exist_ok=True)
    shutil.rmtree(init, ignore_errors=True)
    params = sum(p.numel() for p in module.model.parameters())
    return {"parameters": params, "train_seconds": time.perf_counter() - started, "steps": trainer.global_step,
            "val_loss": float(trainer.callback_metrics["val/loss"]), "history": history.rows}


# ----------------------------------------------------------------------------------------------------
# Stage 3: cold-start SFT


def run_sft(track: Track, paths: Paths, run_id: str, loss: str, seed: int, tau: float | None = None, snapshots: bool = False,
            max_steps: int | None = None, val_every_steps: int | None = None) -> dict:
    """One cold-start SFT run with a validation (generation, diversity, KL) every `val_every_epochs` epochs
    (or every `val_every_steps` steps for `max_steps`), DiversityEarlyStopping in select mode (training goes
    on to the end; the peak is exported), and optionally a Hugging Face snapshot at every validation."""
    import lightning as L

    from aesl_lightning import DiversityEarlyStopping, SFTDataModule, SFTModule
    from aesl_lightning.lora import LoRAConfig
    from aesl_lightning.losses import LossConfig

    run_dir = paths.run_dir(run_id)
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt
    L.seed_everything(seed, workers=True, verbose=False)
    # The CPU track was run with the first reading of AESL (whole-prefix subsequence gate, rho 0): keep it, so that a
    # rerun reproduces the recorded results; the default AESL is a different loss (see the README).
    loss_name = "aesl_v1" if loss == "aesl" else loss
    loss_config = LossConfig(name=loss_name) if tau is None else LossConfig(name=loss_name, tau_tok=tau, tau_seq=tau)
    lora = LoRAConfig(r=track.lora_rank) if track.lora_rank else None
    module = SFTModule(name_or_path=_base_name(track, paths), loss=loss_config, lr=track.sft_lr, warmup_steps=0.05, scheduler="constant",
                       lora=lora, val_generation=_val_generation(track), histogram_every_n_steps=0)
    data = SFTDataModule(train=str(paths.data / "coldstart.jsonl"), val=str(paths.data / "val.jsonl"), batch_size=track.sft_batch,
                         max_length=512, seed=seed)
    history = History(run_dir / "snapshots" if snapshots else None)
    # the validation before training (step 0) is not seen by the callback (it runs in fit only), so the peak is an SFT checkpoint
    turning = DiversityEarlyStopping(monitor=["val/gen_entropy", "val/self_bleu"], patience=track.turning_point_patience, stop=False,
                                     dirpath=str(run_dir / "turning_point"), save_weights_only=True)
    length = ({"max_epochs": track.sft_epochs, "check_val_every_n_epoch": track.val_every_epochs} if max_steps is None else
              {"max_steps": max_steps, "max_epochs": -1, "val_check_interval": val_every_steps, "check_val_every_n_epoch": None})
    trainer = _trainer(run_dir, "logs", **length, gradient_clip_val=1.0, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[history, turning])
    started = time.perf_counter()
    trainer.validate(module, datamodule=data, verbose=False)  # step 0: the starting model (base) on the same metrics
    trainer.fit(module, datamodule=data)
    module.export_hf(run_dir / "final")
    summary = json.loads((run_dir / "turning_point" / "turning_point.json").read_text())
    return {"loss": loss, "tau": tau, "seed": seed, "history": history.rows, "final_step": trainer.global_step,
            "turning_point": {"step": summary.get("peak", {}).get("step"), "fired": summary.get("turning_point") is not None,
                              "summary": summary},
            "train_seconds": time.perf_counter() - started}


def _base_name(track: Track, paths: Paths) -> str:
    return track.base_model or str(paths.base)


# ----------------------------------------------------------------------------------------------------
# Stage 4: GRPO and evaluation


def _grpo_config(track: Track):
    from aesl_lightning.grpo import GRPOConfig

    return GRPOConfig(num_generations=track.num_generations, temperature=1.0, max_new_tokens=track.max_new_tokens, beta=track.beta,
                      epsilon=0.2, epsilon_high=0.28, loss_type="dr_grpo", scale_rewards="group", log_completions_every_n_steps=10,
                      reward_funcs=["aesl_lightning.rewards.math_accuracy", "aesl_lightning.rewards.boxed_format"], reward_weights=[1.0, 0.1])


def run_grpo(track: Track, paths: Paths, run_id: str, start: str, seed: int, steps: int, splits: tuple[str, ...] = ("test", "test_hard")) -> dict:
    import lightning as L

    from aesl_lightning import PromptDataModule
    from aesl_lightning.grpo import GRPOEvaluation, GRPOModule
    from aesl_lightning.lora import LoRAConfig

    run_dir = paths.run_dir(run_id)
    shutil.rmtree(run_dir, ignore_errors=True)
    L.seed_everything(seed, workers=True, verbose=False)
    grpo = _grpo_config(track)
    evaluation = GRPOEvaluation(num_samples=track.eval_samples, temperature=1.0, max_new_tokens=track.max_new_tokens, greedy=True,
                                num_text_samples=2)
    lora = LoRAConfig(r=track.lora_rank) if track.lora_rank else None
    module = GRPOModule(name_or_path=start, grpo=grpo, evaluation=evaluation, lr=track.grpo_lr, scheduler="constant", lora=lora)
    data = PromptDataModule(train=str(paths.data / "rl.jsonl"), val_size=0, batch_size=track.grpo_prompts, max_prompt_length=512, seed=seed)
    trainer = _trainer(run_dir, "logs", max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    history = TrainLog()
    trainer.callbacks.append(history)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - started
    results = evaluate(module, paths, run_dir, splits)
    return {"start": start, "seed": seed, "steps": trainer.global_step, "train": history.summary(), "eval": results,
            "train_seconds": train_seconds, "seconds": time.perf_counter() - started}


def evaluate(module, paths: Paths, run_dir: Path, splits: tuple[str, ...]) -> dict:
    """Greedy accuracy, pass@1 and pass@k (and the samples' diversity) of `module` on each test split."""
    from aesl_lightning import PromptDataModule

    results = {}
    for split in splits:
        eval_data = PromptDataModule(train=None, test=str(paths.data / f"{split}.jsonl"), val_size=0, eval_batch_size=64, max_prompt_length=512)
        (metrics,) = _trainer(run_dir, f"eval_{split}").test(module, datamodule=eval_data, verbose=False)
        results[split] = {k.removeprefix("test/"): float(v) for k, v in metrics.items()}
    return results


def run_start_eval(track: Track, paths: Paths, run_id: str, start: str, seed: int) -> dict:
    """The starting point of an arm on the test splits before RL (same evaluation as after RL): the RL gain."""
    import lightning as L

    from aesl_lightning.grpo import GRPOEvaluation, GRPOModule

    run_dir = paths.run_dir(run_id)
    shutil.rmtree(run_dir, ignore_errors=True)
    L.seed_everything(seed, workers=True, verbose=False)
    evaluation = GRPOEvaluation(num_samples=track.eval_samples, temperature=1.0, max_new_tokens=track.max_new_tokens, greedy=True,
                                num_text_samples=2)
    module = GRPOModule(name_or_path=start, evaluation=evaluation, grpo=_grpo_config(track))
    return {"start": start, "seed": seed, "eval": evaluate(module, paths, run_dir, ("test", "test_hard"))}


class TrainLog(Callback):
    """GRPO's per-step rollout numbers, and their means over the first and the last quarter of training."""

    keys = ("train/reward/mean", "train/accuracy", "train/frac_reward_zero_std", "train/entropy", "train/self_bleu", "train/gen_length")

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(trainer.callback_metrics[k]) for k in self.keys if k in trainer.callback_metrics})

    def summary(self) -> dict:
        def mean(rows, key):
            values = [r[key] for r in rows if key in r]
            return sum(values) / len(values) if values else None

        quarter = max(1, len(self.rows) // 4)
        first, last = self.rows[:quarter], self.rows[-quarter:]
        return {"per_step": self.rows,
                **{f"first_quarter/{k.removeprefix('train/')}": mean(first, k) for k in self.keys},
                **{f"last_quarter/{k.removeprefix('train/')}": mean(last, k) for k in self.keys}}


# ----------------------------------------------------------------------------------------------------
# Choosing the starting points of RL

ARMS = ("base", "ce_best_acc", "ce_end", "ce_turning_point", "dft", "aesl")
ARM_LABELS = {
    "base": "1. RL from the base model (no SFT)",
    "ce_best_acc": "2. CE, best val accuracy",
    "ce_end": "3. CE, end of training",
    "ce_turning_point": "4. CE, diversity turning point",
    "dft": "5. DFT, end of training",
    "aesl": "6. AESL, end of training",
}


def best_accuracy_row(history: list[dict]) -> dict:
    """The first SFT validation (step > 0: not the starting model) with the highest greedy answer accuracy
    (ties: the earlier, as ModelCheckpoint)."""
    trained = [r for r in history if r["step"] > 0] or history
    best = max(r.get("val/answer_accuracy", float("-inf")) for r in trained)
    return next(r for r in trained if r.get("val/answer_accuracy", float("-inf")) == best)


def row_at_step(history: list[dict], step: int) -> dict:
    return next(r for r in history if r["step"] == step)


def chosen_tau(track: Track, paths: Paths) -> tuple[float, list[dict]]:
    """AESL threshold (tau_tok = tau_seq) with the best final validation answer accuracy on seed 0 (ties:
    higher sampling entropy). Only the validation split is looked at."""
    rows = []
    for tau in track.aesl_taus:
        final = read_json(paths.result(aesl_sweep_id(tau, track.seeds[0])))["history"][-1]
        rows.append({"tau": tau, "val/answer_accuracy": final.get("val/answer_accuracy"), "val/gen_entropy": final.get("val/gen_entropy"),
                     "val/self_bleu": final.get("val/self_bleu"), "val/pass@1": final.get("val/pass@1")})
    best = max(rows, key=lambda r: (r["val/answer_accuracy"] or 0.0, r["val/gen_entropy"] or 0.0))
    return best["tau"], rows


def aesl_sweep_id(tau: float, seed: int) -> str:
    return f"sft/aesl-tau{tau:g}-s{seed}"


def aesl_id(track: Track, paths: Paths, seed: int) -> str:
    return aesl_sweep_id(chosen_tau(track, paths)[0], seed) if seed == track.seeds[0] else f"sft/aesl-s{seed}"


def starting_point(track: Track, paths: Paths, arm: str, seed: int) -> tuple[str, dict | None]:
    """(model folder to start RL from, the SFT validation row of that checkpoint; None for the base model)."""
    if arm == "base":
        return _base_name(track, paths), None
    if arm == "aesl":
        sft_id = aesl_id(track, paths, seed)
    else:
        sft_id = f"sft/dft-s{seed}" if arm == "dft" else f"sft/ce-s{seed}"
    result, run_dir = read_json(paths.result(sft_id)), paths.run_dir(sft_id)
    history = result["history"]
    if arm == "ce_best_acc":
        row = best_accuracy_row(history)
        return str(run_dir / "snapshots" / f"step{row['step']:05d}"), row
    if arm == "ce_turning_point":
        return str(run_dir / "turning_point" / "hf_model"), row_at_step(history, result["turning_point"]["step"])
    return str(run_dir / "final"), history[-1]


# ----------------------------------------------------------------------------------------------------
# The plan


def plan(track: Track, paths: Paths, ablation: bool = False) -> list[Run]:
    if ablation:
        return plan_ablation(track)
    base = ("base",) if track.base_model is None else ("data",)
    runs = [Run("data", "data")]
    if track.base_model is None:
        runs.append(Run("base", "base", deps=("data",)))
    first = track.seeds[0]
    for seed in track.seeds:
        runs.append(Run(f"sft/ce-s{seed}", "sft", {"loss": "ce", "seed": seed, "snapshots": True}, base))
    sweep = aesl_sweep_runs(track, base)
    sweep_ids = tuple(r.id for r in sweep)
    runs += sweep
    for seed in track.seeds:
        runs.append(Run(f"sft/dft-s{seed}", "sft", {"loss": "dft", "seed": seed}, base))
    for seed in track.seeds[1:]:
        runs.append(Run(f"sft/aesl-s{seed}", "sft", {"loss": "aesl", "seed": seed, "tau": "chosen"}, sweep_ids))
    def arm_deps(arm: str, seed: int) -> tuple[str, ...]:
        ce = (f"sft/ce-s{seed}",)
        return {"base": base, "ce_best_acc": ce, "ce_end": ce, "ce_turning_point": ce, "dft": (f"sft/dft-s{seed}",),
                "aesl": sweep_ids + ((f"sft/aesl-s{seed}",) if seed != first else ())}[arm]

    for seed in track.seeds:
        runs += [Run(f"grpo/{arm}-s{seed}", "grpo", {"arm": arm, "seed": seed}, arm_deps(arm, seed)) for arm in ARMS]
    for seed in track.seeds:  # the same starting points before RL, on the same test splits: the RL gain
        runs += [Run(f"start_eval/{arm}-s{seed}", "start_eval", {"arm": arm, "seed": seed}, arm_deps(arm, seed)) for arm in ARMS]
    num_validations = 1 + track.sft_epochs // track.val_every_epochs  # step 0 (the base model) included
    for index in range(0, num_validations, track.sweep_every):
        runs.append(Run(f"sweep/snapshot{index:02d}", "sweep", {"index": index, "seed": first}, (f"sft/ce-s{first}",)))
    return runs


def aesl_sweep_runs(track: Track, base: tuple[str, ...]) -> list[Run]:
    """The AESL threshold sweep on the first seed, from which `chosen_tau` picks on validation."""
    first = track.seeds[0]
    return [Run(aesl_sweep_id(tau, first), "sft", {"loss": "aesl", "seed": first, "tau": tau}, base) for tau in track.aesl_taus]


def execute(track: Track, paths: Paths, run: Run, threads: int) -> str:
    """Run one job in a worker process and write its result JSON (atomically, last)."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "transformers",
                 "aesl_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    p = run.params
    if run.kind == "data":
        result = make_data(track, paths)
    elif run.kind == "base":
        result = make_base(track, paths)
    elif run.kind == "sft":
        tau = chosen_tau(track, paths)[0] if p.get("tau") == "chosen" else p.get("tau")
        result = run_sft(track, paths, run.id, p["loss"], p["seed"], tau=tau, snapshots=p.get("snapshots", False))
    elif run.kind == "grpo":
        start, row = starting_point(track, paths, p["arm"], p["seed"])
        result = run_grpo(track, paths, run.id, start, p["seed"], track.grpo_steps)
        result.update(arm=p["arm"], sft_row=row)
    elif run.kind == "start_eval":
        start, row = starting_point(track, paths, p["arm"], p["seed"])
        result = run_start_eval(track, paths, run.id, start, p["seed"])
        result.update(arm=p["arm"], sft_row=row)
    elif run.kind == "sweep":
        sft = read_json(paths.result(f"sft/ce-s{p['seed']}"))
        row = sft["history"][p["index"]]
        start = str(paths.run_dir(f"sft/ce-s{p['seed']}") / "snapshots" / f"step{row['step']:05d}")
        result = run_grpo(track, paths, run.id, start, p["seed"], track.sweep_grpo_steps, splits=("test",))
        result.update(sft_row=row)
    elif run.kind == "ablation":
        result = run_ablation_cell(track, paths, run)
    else:
        raise ValueError(f"unknown run kind {run.kind!r}")
    result["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(paths.result(run.id), result)
    return run.id


def run_all(track: Track, paths: Paths, runs: list[Run], workers: int, threads: int) -> None:
    """Run every unfinished job, dependencies first, `workers` at a time, with a progress bar."""
    import multiprocessing

    from tqdm import tqdm

    done = {r.id for r in runs if paths.result(r.id).is_file()}
    pending = [r for r in runs if r.id not in done]
    bar = tqdm(total=len(runs), initial=len(done), desc=f"{track.name} track", unit="run", dynamic_ncols=True)
    running: dict = {}
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch thread pools forked
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while pending or running:
            ready = [r for r in pending if all(d in done for d in r.deps)][: workers - len(running)]
            for run in ready:
                pending.remove(run)
                # a run that has the machine to itself (the pre-training) gets every worker's threads
                alone = not running and len(ready) == 1
                running[pool.submit(execute, track, paths, run, threads * workers if alone else threads)] = run
            if not running:
                raise RuntimeError(f"runs with unmet dependencies: {[r.id for r in pending]}")
            bar.set_postfix_str(", ".join(sorted(r.id for r in running.values())))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                future.result()  # a failed run stops the track (finished runs stay on disk for the rerun)
                done.add(run.id)
                bar.update(1)
    bar.close()


# ----------------------------------------------------------------------------------------------------
# Ablation: cold-start set size x difficulty, CE (best validation accuracy) against AESL

ABLATION_SIZES = (32, 128, 512)
ABLATION_DIFFICULTIES = ("easy", "hard")


def plan_ablation(track: Track) -> list[Run]:
    base = ("base",) if track.base_model is None else ("data",)
    runs = [Run("data", "data")] + ([Run("base", "base", deps=("data",))] if track.base_model is None else [])
    # AESL's thresholds are the main table's, chosen on its validation split: that sweep runs first if missing
    sweep = aesl_sweep_runs(track, base)
    sweep_ids = tuple(r.id for r in sweep)
    runs += sweep
    smoke = track.name.endswith("smoke")
    sizes, seeds = ((8, 16), track.seeds[:1]) if smoke else (ABLATION_SIZES, track.seeds)
    for seed in seeds:  # seed outermost: an interrupted ablation holds whole seeds of the table
        for size in sizes:
            for difficulty in ABLATION_DIFFICULTIES:
                for method in ("ce_best_acc", "aesl"):
                    params = {"size": size, "difficulty": difficulty, "seed": seed, "method": method}
                    deps = base + (sweep_ids if method == "aesl" else ())
                    runs.append(Run(f"ablation/{method}-n{size}-{difficulty}-s{seed}", "ablation", params, deps))
    return runs


def run_ablation_cell(track: Track, paths: Paths, run: Run) -> dict:
    """One cell: a cold-start set of the given size and difficulty, SFT (CE keeping the best-accuracy snapshot,
    or AESL with the thresholds the main table chose on its validation split), the main table's GRPO budget, test on
    that difficulty.
    Every set size gets the same number of optimiser steps as the main table's SFT runs."""
    from aesl_lightning.data.synthetic import (
        generate_arithmetic,
        read_jsonl,
        write_jsonl,
    )

    p = run.params
    task = track.task if p["difficulty"] == "easy" else track.hard_task
    data_dir = paths.run_dir(run.id) / "data"
    exclude = [r for name in ("val", "test", "test_hard", "rl") for r in read_jsonl(paths.data / f"{name}.jsonl")]
    style = (track.coldstart_style,)
    coldstart = generate_arithmetic(task.config(num_examples=p["size"], seed=track.data_seed + 1000 + p["size"], solution_styles=style), exclude)
    val = generate_arithmetic(task.config(num_examples=track.num_val, seed=track.data_seed + 2000, solution_styles=style), exclude + coldstart)
    write_jsonl(coldstart, data_dir / "coldstart.jsonl")
    write_jsonl(val, data_dir / "val.jsonl")
    steps_per_epoch = math.ceil(track.num_coldstart / track.sft_batch)
    total_steps = track.sft_epochs * steps_per_epoch
    val_every = track.val_every_epochs * steps_per_epoch
    sub = Paths(paths.out, paths.run_dir(run.id))
    sub.data = data_dir
    sub.base = paths.base
    sft_id = "sft"
    loss, tau = ("ce", None) if p["method"] == "ce_best_acc" else ("aesl", chosen_tau(track, paths)[0])
    sft = run_sft(track, sub, sft_id, loss, p["seed"], tau=tau, snapshots=p["method"] == "ce_best_acc",
                  max_steps=total_steps, val_every_steps=val_every)
    if p["method"] == "ce_best_acc":
        row = best_accuracy_row(sft["history"])
        start = sub.run_dir(sft_id) / "snapshots" / f"step{row['step']:05d}"
    else:
        row, start = sft["history"][-1], sub.run_dir(sft_id) / "final"
    test_split = "test" if p["difficulty"] == "easy" else "test_hard"
    grpo = run_grpo(track, paths, f"{run.id}/grpo", str(start), p["seed"], track.grpo_steps, splits=(test_split,))
    return {**p, "tau": tau, "sft_row": row, "eval": grpo["eval"][test_split], "train": {k: v for k, v in grpo["train"].items() if k != "per_step"}}


# ----------------------------------------------------------------------------------------------------
# Report

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% t-interval over seeds (0 for a single value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T975.get(n - 1, 1.96) * sd / math.sqrt(n)


from aesl_lightning.study.stats import spearman  # noqa: E402  (Spearman's rank correlation, average ranks for ties)


SFT_COLUMNS = [("val/answer_accuracy", "val acc"), ("val/gen_entropy", "entropy"), ("val/self_bleu", "self-BLEU"),
               ("val/kl_to_base", "KL to base"), ("val/pass@{k}", "pass@{k}")]


def _fmt(mean: float, half: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarise(track: Track, paths: Paths) -> dict:
    """Every number of the report, from the run JSON files."""
    k_val, k_eval = track.val_samples, track.eval_samples
    arms = {}
    for arm in ARMS:
        results = [read_json(paths.result(f"grpo/{arm}-s{s}")) for s in track.seeds if paths.result(f"grpo/{arm}-s{s}").is_file()]
        if not results:
            continue
        if arm == "base":  # the base model's own validation numbers: the step-0 row of that seed's CE run
            for r in results:
                ce = paths.result(f"sft/ce-s{r['seed']}")
                r["sft_row"] = r["sft_row"] or (read_json(ce)["history"][0] if ce.is_file() else None)
        entry = {"seeds": [r["seed"] for r in results], "sft": {}, "rl": {}}
        for key, _ in SFT_COLUMNS:
            key = key.format(k=k_val)
            values = [(r["sft_row"] or {}).get(key) for r in results]
            entry["sft"][key] = {"values": values, "mean_ci": mean_ci(values)}
        entry["sft_step"] = [(r["sft_row"] or {}).get("step") for r in results]
        for split in ("test", "test_hard"):
            for key in ("greedy_accuracy", "pass@1", f"pass@{k_eval}", "gen_entropy", "self_bleu"):
                values = [r["eval"][split].get(key) for r in results]
                entry["rl"][f"{split}/{key}"] = {"values": values, "mean_ci": mean_ci(values)}
        before = [read_json(paths.result(f"start_eval/{arm}-s{r['seed']}")) for r in results
                  if paths.result(f"start_eval/{arm}-s{r['seed']}").is_file()]
        if len(before) == len(results):
            for split in ("test", "test_hard"):
                for key in ("greedy_accuracy", "pass@1", f"pass@{k_eval}"):
                    values = [b["eval"][split].get(key) for b in before]
                    entry["rl"][f"before/{split}/{key}"] = {"values": values, "mean_ci": mean_ci(values)}
                    gains = [a["eval"][split].get(key) - b["eval"][split].get(key) for a, b in zip(results, before)]
                    entry["rl"][f"gain/{split}/{key}"] = {"values": gains, "mean_ci": mean_ci(gains)}
        zero = [r["train"].get("first_quarter/frac_reward_zero_std") for r in results]
        entry["rl"]["frac_reward_zero_std_first_quarter"] = {"values": zero, "mean_ci": mean_ci(zero)}
        arms[arm] = entry
    sweep = []
    for run in sorted(paths.runs.glob("sweep__*.json")):
        r = read_json(run)
        sweep.append({"step": r["sft_row"]["step"], "sft_accuracy": r["sft_row"].get("val/answer_accuracy"),
                      "sft_entropy": r["sft_row"].get("val/gen_entropy"), "sft_self_bleu": r["sft_row"].get("val/self_bleu"),
                      "sft_pass@k": r["sft_row"].get(f"val/pass@{k_val}"),
                      "rl_pass@1": r["eval"]["test"].get("pass@1"), "rl_greedy": r["eval"]["test"].get("greedy_accuracy"),
                      f"rl_pass@{k_eval}": r["eval"]["test"].get(f"pass@{k_eval}")})
    correlations = {}  # {subset: {predictor: {post-RL metric: Spearman rho}}}
    for subset, points in (("all snapshots", sweep), ("SFT snapshots only (step > 0)", [s for s in sweep if s["step"] > 0])):
        if len(points) >= 3:
            correlations[subset] = {
                name: {post: spearman([sign * s[key] for s in points], [s[post] for s in points])
                       for post in ("rl_pass@1", f"rl_pass@{k_eval}", "rl_greedy")}
                for name, key, sign in (("SFT accuracy", "sft_accuracy", 1), ("SFT entropy", "sft_entropy", 1),
                                        ("SFT -self-BLEU", "sft_self_bleu", -1), (f"SFT pass@{k_val}", "sft_pass@k", 1))}
    aesl = None
    if all(paths.result(aesl_sweep_id(t, track.seeds[0])).is_file() for t in track.aesl_taus):
        tau, rows = chosen_tau(track, paths)
        aesl = {"chosen_tau": tau, "sweep": rows}
    base = read_json(paths.result("base")) if paths.result("base").is_file() else None
    return {"track": dataclasses.asdict(track), "arms": arms, "sweep": sweep, "correlations": correlations, "aesl_selection": aesl,
            "base": base}


def write_report(track: Track, paths: Paths, summary: dict, meta: dict) -> Path:
    k_val, k_eval = track.val_samples, track.eval_samples
    lines = [f"# Reproduction, {track.name} track", "",
             f"Command: `{meta['command']}`  ", f"Seeds: {list(track.seeds)}; data seed {track.data_seed}  ",
             f"Machine: {meta['machine']}  ", ("Wall time: " + f"{sum(i['wall_minutes'] for i in meta['invocations']):.1f} min over {len(meta['invocations'])} invocation(s) ("
             + " + ".join(f"{i['wall_minutes']:.1f}" for i in meta["invocations"])
             + f"; a rerun resumes the finished runs); all runs summed over workers: {meta['run_minutes']:.1f} min  "), f"Commit: {meta['commit']}", ""]
    if track.name.endswith("smoke"):
        lines += [("**Smoke run**: every stage for a step or two on sets of a few problems, to check the pipeline end to end. "
                   "The numbers below are not results and say nothing about the methods."), ""]
    if summary["base"]:
        b = summary["base"]
        accuracy = (b.get("history") or [{}])[-1].get("val/answer_accuracy", float("nan"))
        lines += [(f"Base model: Llama architecture, {b['parameters'] / 1e6:.2f}M parameters, pre-trained from scratch for {b['steps']} "
                  f"steps on {track.num_pretrain} problems in 3 solution styles ({b['train_seconds'] / 60:.1f} min); on held-out problems "
                  f"of the pre-training mix ({track.pretrain_task.min_digits}-{track.pretrain_task.max_digits} digit operands): loss "
                  f"{b['val_loss']:.3f}, greedy answer accuracy {accuracy:.3f}. Its numbers on the task itself are the step-0 rows below."), ""]
    lines += ["## At the SFT checkpoint each arm starts RL from (validation split)", "",
              "| arm | step | " + " | ".join(label.format(k=k_val) for _, label in SFT_COLUMNS) + " |",
              "|---|---|" + "---|" * len(SFT_COLUMNS)]
    for arm, entry in summary["arms"].items():
        cells = [_fmt(*entry["sft"][key.format(k=k_val)]["mean_ci"]) for key, _ in SFT_COLUMNS]
        steps = "/".join("0" if s is None else str(s) for s in entry["sft_step"])
        lines.append(f"| {ARM_LABELS[arm]} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", f"## After the same GRPO budget ({track.grpo_steps} steps x {track.grpo_prompts} prompts x G={track.num_generations})", "",
              (f"Test splits: in-distribution ({track.num_test}) and harder ({track.num_test_hard}: {track.hard_task.min_steps}-"
              f"{track.hard_task.max_steps} operations). pass@1 = mean accuracy of {k_eval} samples, pass@{k_eval} unbiased."), "",
              f"| arm | test greedy | test pass@1 | test pass@{k_eval} | hard greedy | hard pass@1 | hard pass@{k_eval} |",
              "|---|---|---|---|---|---|---|"]
    for arm, entry in summary["arms"].items():
        keys = [f"{s}/{m}" for s in ("test", "test_hard") for m in ("greedy_accuracy", "pass@1", f"pass@{k_eval}")]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(_fmt(*entry["rl"][k]["mean_ci"]) for k in keys) + " |")
    if all("gain/test/pass@1" in e["rl"] for e in summary["arms"].values()):
        lines += ["", "### What GRPO changed: before -> after on the same test splits (gain with its 95% interval)", "",
                  f"| arm | test pass@1 | gain | test pass@{k_eval} | gain | hard pass@1 | gain | rollout groups with zero reward variance (first quarter of RL) |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, entry in summary["arms"].items():
            rl = entry["rl"]
            cells = []
            for split, key in (("test", "pass@1"), ("test", f"pass@{k_eval}"), ("test_hard", "pass@1")):
                b, a = rl[f"before/{split}/{key}"]["mean_ci"][0], rl[f"{split}/{key}"]["mean_ci"][0]
                cells += [f"{b:.3f} -> {a:.3f}", _fmt(*rl[f"gain/{split}/{key}"]["mean_ci"])]
            cells.append(_fmt(*rl["frac_reward_zero_std_first_quarter"]["mean_ci"], digits=2))
            lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± half-width of the 95% t-interval over seeds.", ""]
    if summary["aesl_selection"]:
        sel = summary["aesl_selection"]
        lines += [f"## AESL threshold sweep (seed {track.seeds[0]}, validation split only)", "",
                  "| tau_tok = tau_seq | final val acc | entropy | self-BLEU | chosen |", "|---|---|---|---|---|"]
        for r in sel["sweep"]:
            lines.append(f"| {r['tau']:g} | {r['val/answer_accuracy']:.3f} | {r['val/gen_entropy']:.3f} | {r['val/self_bleu']:.3f} | "
                         f"{'yes' if r['tau'] == sel['chosen_tau'] else ''} |")
        lines.append("")
    if summary["sweep"]:
        c = summary["correlations"]
        lines += [f"## Checkpoint sweep (CE seed {track.seeds[0]}, {track.sweep_grpo_steps} GRPO steps from each snapshot)", "",
                  "| SFT step | SFT val acc | SFT entropy | SFT self-BLEU | post-RL test pass@1 | post-RL greedy |", "|---|---|---|---|---|---|"]
        for s in summary["sweep"]:
            lines.append(f"| {s['step']} | {s['sft_accuracy']:.3f} | {s['sft_entropy']:.3f} | {s['sft_self_bleu']:.3f} | "
                         f"{s['rl_pass@1']:.3f} | {s['rl_greedy']:.3f} |")
        for subset, table in c.items():
            lines += ["", f"Spearman rank correlation of the snapshot's SFT validation numbers with its post-RL test numbers, {subset}:", "",
                      f"| SFT predictor | post-RL pass@1 | post-RL pass@{k_eval} | post-RL greedy |", "|---|---|---|---|"]
            for name, row in table.items():
                lines.append(f"| {name} | " + " | ".join(f"{row[post]:+.2f}" for post in ("rl_pass@1", f"rl_pass@{k_eval}", "rl_greedy")) + " |")
        lines.append("")
    lines += [("Figures: `diversity_curve.png` (CE seed 0: entropy and self-BLEU against step, turning point marked, accuracy below), "
              "`sweep.png` (post-RL accuracy against SFT accuracy and SFT diversity)."), ""]
    out = paths.out / "results.md"
    out.write_text("\n".join(lines))
    return out


def write_figures(track: Track, paths: Paths, summary: dict) -> None:
    from matplotlib.figure import Figure

    from aesl_lightning.plots import plot_diversity

    ce = paths.run_dir(f"sft/ce-s{track.seeds[0]}")
    if (ce / "logs").is_dir():
        plot_diversity(ce, paths.out / "diversity_curve.png")
    sweep = summary["sweep"]
    if sweep:
        fig = Figure(figsize=(10, 4))
        post = [s["rl_pass@1"] for s in sweep]
        for ax, key, label in ((fig.add_subplot(1, 2, 1), "sft_accuracy", "SFT validation accuracy (greedy)"),
                               (fig.add_subplot(1, 2, 2), "sft_entropy", "SFT sampling entropy (nats/token)")):
            xs = [s[key] for s in sweep]
            ax.scatter(xs, post)
            for s, x, y in zip(sweep, xs, post):
                ax.annotate(str(s["step"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(label)
            ax.set_ylabel("post-RL test pass@1")
            ax.set_title(f"Spearman {spearman(xs, post):+.2f}")
        fig.suptitle("Checkpoint sweep: each point is one CE SFT snapshot (step annotated) after the same GRPO")
        fig.tight_layout()
        fig.savefig(paths.out / "sweep.png", dpi=120)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_ablation_report(track: Track, paths: Paths, runs: list[Run], meta: dict) -> Path:
    from matplotlib.figure import Figure

    k = track.eval_samples
    cells: dict[tuple, dict[str, list[dict]]] = {}
    planned = [run for run in runs if run.kind == "ablation"]
    finished = [run for run in planned if paths.result(run.id).is_file()]
    for run in finished:
        p = run.params
        cells.setdefault((p["size"], p["difficulty"]), {}).setdefault(p["method"], []).append(read_json(paths.result(run.id)))
    taus = sorted({r["tau"] for methods in cells.values() for r in methods.get("aesl", []) if r.get("tau") is not None})
    seeds_done = sorted({run.params["seed"] for run in finished})
    lines = [f"# Ablation: cold-start set size x difficulty ({track.name} track)", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ", (f"Wall time: {sum(i['wall_minutes'] for i in meta['invocations']):.1f} min over "
             f"{len(meta['invocations'])} invocation(s)  "),
             f"Seeds with results: {seeds_done} ({len(finished)} of {len(planned)} planned cells finished)", "",
             ("Same SFT step budget for every set size; CE keeps its best-validation-accuracy snapshot, AESL its end of training "
              f"(tau_tok = tau_seq = {', '.join(f'{t:g}' for t in taus) or '?'}, the main table's choice on its validation split); "
              "then the main table's GRPO budget and the test split of the same difficulty."), "",
             ("| set size | difficulty | seeds | SFT val acc CE / AESL | SFT entropy CE / AESL | CE snapshot step | "
              f"post-RL pass@1 CE | post-RL pass@1 AESL | AESL - CE pass@1 (paired) | pass@{k} CE | pass@{k} AESL |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for (size, difficulty), methods in sorted(cells.items()):
        row = {}
        for method in ("ce_best_acc", "aesl"):
            results = methods.get(method, [])
            row[method] = {"seeds": sorted(r["seed"] for r in results),
                           "pass@1": mean_ci([r["eval"].get("pass@1") for r in results]),
                           f"pass@{k}": mean_ci([r["eval"].get(f"pass@{k}") for r in results]),
                           "sft_accuracy": mean_ci([r["sft_row"].get("val/answer_accuracy") for r in results]),
                           "sft_entropy": mean_ci([r["sft_row"].get("val/gen_entropy") for r in results]),
                           "sft_steps": sorted(r["sft_row"].get("step") for r in results)}
        by_seed = {m: {r["seed"]: r["eval"].get("pass@1") for r in methods.get(m, [])} for m in ("ce_best_acc", "aesl")}
        paired = sorted(set(by_seed["ce_best_acc"]) & set(by_seed["aesl"]))
        row["aesl_minus_ce_pass@1"] = mean_ci([by_seed["aesl"][s] - by_seed["ce_best_acc"][s] for s in paired])
        table[f"{size}/{difficulty}"] = row
        ce, aesl = row["ce_best_acc"], row["aesl"]
        lines.append(f"| {size} | {difficulty} | {len(ce['seeds'])} / {len(aesl['seeds'])} | {ce['sft_accuracy'][0]:.2f} / "
                     f"{aesl['sft_accuracy'][0]:.2f} | {ce['sft_entropy'][0]:.3f} / {aesl['sft_entropy'][0]:.3f} | "
                     f"{', '.join(map(str, ce['sft_steps']))} | {_fmt(*ce['pass@1'])} | {_fmt(*aesl['pass@1'])} | "
                     f"{_fmt(*row['aesl_minus_ce_pass@1'])} | {_fmt(*ce[f'pass@{k}'])} | {_fmt(*aesl[f'pass@{k}'])} |")
    lines += ["", ("Mean ± half-width of the 95% t-interval over seeds; the paired column differences the two methods seed by "
                   "seed (same cold-start set and GRPO seed). SFT columns: the validation row of the checkpoint RL starts from "
                   "(CE: its best-accuracy snapshot, at the steps listed; AESL: the end). Figure: `ablation.png`."), ""]
    atomic_write_json(paths.out / "ablation.json", {"table": table, "meta": meta})
    fig = Figure(figsize=(9, 4))
    for i, difficulty in enumerate(ABLATION_DIFFICULTIES):
        ax = fig.add_subplot(1, 2, i + 1)
        sizes = sorted({size for size, d in cells if d == difficulty})
        for method, label in (("ce_best_acc", "CE, best val accuracy"), ("aesl", "AESL")):
            means = [table[f"{s}/{difficulty}"][method]["pass@1"] for s in sizes]
            ax.errorbar(sizes, [m for m, _ in means], yerr=[h for _, h in means], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cold-start set size")
        ax.set_ylabel("post-RL test pass@1")
        ax.set_title(f"{difficulty} problems")
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths.out / "ablation.png", dpi=120)
    out = paths.out / "ablation.md"
    out.write_text("\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------------------
# Command line


def check_same_track(track: Track, paths: Paths) -> None:
    """Resume only runs made with this very configuration: `<out>/track.json` records it on the first call."""
    config = json.loads(json.dumps(dataclasses.asdict(track)))
    recorded = paths.out / "track.json"
    if recorded.is_file() and read_json(recorded) != config:
        changed = sorted(k for k in config if read_json(recorded).get(k) != config[k])
        raise SystemExit(f"{recorded}: the finished runs in {paths.out} were made with a different configuration (changed: "
                         f"{', '.join(changed)}); pass another --out/--work or delete both folders to start over")
    atomic_write_json(recorded, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--track", choices=sorted(TRACKS), default="cpu", help="which track (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps of every stage, on CPU")
    parser.add_argument("--ablation", action="store_true", help="the set-size x difficulty ablation instead of the main table")
    parser.add_argument("--out", type=Path, help="results folder (default: experiments/results/<track>[-smoke])")
    parser.add_argument("--work", type=Path, help="weights and logs (default: lightning_logs/reproduce/<track>[-smoke])")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the track's seeds")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the runs finished so far (an interrupted ablation, say)")
    args = parser.parse_args(argv)
    track = TRACKS[args.track]
    if args.seeds:
        track = replace(track, seeds=tuple(args.seeds))
    if args.smoke:
        track = track.smoke()
    # the ablation shares the track's folders: its data, base model and run records (written as ablation.*)
    paths = Paths(args.out or REPO / "experiments" / "results" / track.name, args.work or REPO / "lightning_logs" / "reproduce" / track.name)
    check_same_track(track, paths)
    restore_shared_inputs(track, paths)
    started = time.perf_counter()
    runs = plan(track, paths, ablation=args.ablation)
    if not args.report_only:
        run_all(track, paths, runs, args.workers, args.threads)
    elif not args.ablation and not all(paths.result(r.id).is_file() for r in runs):
        raise SystemExit(f"{paths.out}: the main table needs every run finished; run without --report-only to finish them")
    wall = time.perf_counter() - started
    meta_path = paths.out / ("ablation_meta.json" if args.ablation else "meta.json")
    previous = read_json(meta_path) if meta_path.is_file() else {"invocations": []}
    invocation = [] if args.report_only else [{"wall_minutes": wall / 60, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}]
    meta = {"command": "python experiments/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]), "machine": machine(),
            "commit": commit(), "wall_minutes": wall / 60, "workers": args.workers, "threads": args.threads,
            "run_minutes": sum(read_json(paths.result(r.id)).get("wall_seconds", 0.0) for r in runs if paths.result(r.id).is_file()) / 60,
            "invocations": previous["invocations"] + invocation}
    if args.report_only and "command" in previous:  # the runs were made by the earlier command, at its commit
        meta.update({k: previous[k] for k in ("command", "commit", "workers", "threads") if k in previous})
    atomic_write_json(meta_path, meta)
    if args.ablation:
        out = write_ablation_report(track, paths, runs, meta)
    else:
        summary = summarise(track, paths)
        atomic_write_json(paths.out / "results.json", {"summary": summary, "meta": meta})
        write_figures(track, paths, summary)
        out = write_report(track, paths, summary, meta)
    print(f"wrote {out} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
