"""The pipeline's stages, each the toolkit itself (SFTModule, DiversityEarlyStopping, GRPOModule): the data splits,
the from-scratch base model, a cold-start SFT run, a GRPO run and the evaluation on the test splits."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from reproduction.config import Paths, Track


def make_data(track: Track, paths: Paths) -> dict:
    """Disjoint JSONL splits under `paths.data` (each excludes every earlier one: no shared prompt or expression)."""
    from aesl_lightning.data.synthetic import SOLUTION_STYLES, generate_arithmetic, write_jsonl

    seed, style = track.data_seed, (track.coldstart_style,)
    specs = [
        ("coldstart", track.task.config(num_examples=track.num_coldstart, seed=seed + 1, solution_styles=style)),
        ("val", track.task.config(num_examples=track.num_val, seed=seed + 2, solution_styles=style)),
        ("test", track.task.config(num_examples=track.num_test, seed=seed + 3, solution_styles=style)),
        ("test_hard", track.hard_task.config(num_examples=track.num_test_hard, seed=seed + 4, solution_styles=style)),
        ("rl", track.task.config(num_examples=track.num_rl, seed=seed + 5, solution_styles=style)),
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
    digests = {name: hashlib.sha256((paths.data / f"{name}.jsonl").read_bytes()).hexdigest() for name in sizes}
    return {"sizes": sizes, "coldstart_style": track.coldstart_style, "sha256": digests}


def restore_shared_inputs(track: Track, paths: Paths) -> None:
    """A track whose results are committed but whose work folder is gone (a fresh clone) gets back what later units
    read: the data splits, regenerated (seeded) and checked against the recorded digests, and the pre-trained base
    model, copied from `<out>/base_model`. Without that copy the base cannot be restored; say so, never pre-train a
    different base under finished units."""
    store = paths.store
    if store.done("data"):
        record = store.load("data")["result"]
        if not all((paths.data / f"{name}.jsonl").is_file() for name in record["sizes"]):
            regenerated = make_data(track, paths)
            for key in ("sizes", "sha256"):
                if key in record and regenerated[key] != record[key]:
                    raise SystemExit(f"{store.path('data')}: the regenerated data splits differ from the recorded ones ({key}); "
                                     "the generator changed since these units were made: use another --out/--work")
    if track.base_model is None and store.done("base") and not (paths.base / "config.json").is_file():
        if not (paths.base_copy / "config.json").is_file():
            raise SystemExit(f"{store.path('base')} records a pre-trained base model, but neither {paths.base} nor "
                             f"{paths.base_copy} holds its weights; delete that file to pre-train again (units already "
                             "finished were made from the old base)")
        shutil.copytree(paths.base_copy, paths.base)


def use_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer(run_dir: Path, name: str, **kwargs):
    """A Trainer logging to TensorBoard under `<run_dir>/<name>`: bf16 on a GPU, fp32 on CPU, no progress bar."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="gpu" if use_gpu() else "cpu", devices=1, precision="bf16-mixed" if use_gpu() else "32-true",
        logger=TensorBoardLogger(save_dir=str(run_dir), name=name, version=""),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        inference_mode=False,  # as the committed results were made (no numerical effect; CausalLMModule now resets metrics at fit start)
        **kwargs,
    )


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


def make_base(track: Track, paths: Paths, seed: int = 0) -> dict:
    """Pre-train a small Llama-style model from scratch on the broad corpus (CE on completions)."""
    import lightning as L

    from aesl_lightning import LossConfig, SFTDataModule, SFTModule
    from aesl_lightning.infra.tiny import char_tokenizer, tiny_model
    from aesl_lightning.modules.evaluation import ValidationGeneration

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
    fit = trainer(run_dir, "logs", max_steps=track.pretrain_steps, gradient_clip_val=1.0, enable_checkpointing=False,
                  num_sanity_val_steps=0, val_check_interval=min(250, track.pretrain_steps), check_val_every_n_epoch=None,
                  callbacks=[history])
    started = time.perf_counter()
    fit.fit(module, datamodule=data)
    module.export_hf(paths.base)
    shutil.copytree(paths.base, paths.base_copy, dirs_exist_ok=True)
    shutil.rmtree(init, ignore_errors=True)
    params = sum(p.numel() for p in module.model.parameters())
    return {"parameters": params, "train_seconds": time.perf_counter() - started, "steps": fit.global_step,
            "val_loss": float(fit.callback_metrics["val/loss"]), "history": history.rows}


def base_name(track: Track, paths: Paths) -> str:
    """The model every arm starts from: the track's real model, or the pre-trained one."""
    return track.base_model or str(paths.base)


def run_sft(track: Track, *, run_dir: Path, data_dir: Path, base: str, loss: str, seed: int, tau: float | None = None,
            snapshots: bool = False, max_steps: int | None = None, val_every_steps: int | None = None) -> dict:
    """One cold-start SFT run on `<data_dir>/coldstart.jsonl` with a validation (generation, diversity, KL) every
    `val_every_epochs` epochs (or every `val_every_steps` steps for `max_steps`), DiversityEarlyStopping in select
    mode (training goes on to the end; the peak is exported), and optionally a Hugging Face snapshot at every
    validation."""
    import lightning as L

    from aesl_lightning import DiversityEarlyStopping, LoRAConfig, LossConfig, SFTDataModule, SFTModule
    from aesl_lightning.modules.evaluation import ValidationGeneration

    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt
    L.seed_everything(seed, workers=True, verbose=False)
    # The CPU track was run with the first reading of AESL (whole-prefix subsequence gate, rho 0): keep it, so that a
    # rerun reproduces the recorded results; the default AESL is a different loss (see the README).
    loss_name = "aesl_v1" if loss == "aesl" else loss
    loss_config = LossConfig(name=loss_name) if tau is None else LossConfig(name=loss_name, tau_tok=tau, tau_seq=tau)
    lora = LoRAConfig(r=track.lora_rank) if track.lora_rank else None
    validation = ValidationGeneration(num_prompts=track.val_prompts, max_new_tokens=track.max_new_tokens, num_samples=track.val_samples,
                                      temperature=1.0, batch_size=min(track.val_prompts, 64), num_text_samples=2, kl_to_base=True)
    module = SFTModule(name_or_path=base, loss=loss_config, lr=track.sft_lr, warmup_steps=0.05, scheduler="constant", lora=lora,
                       val_generation=validation, histogram_every_n_steps=0)
    data = SFTDataModule(train=str(data_dir / "coldstart.jsonl"), val=str(data_dir / "val.jsonl"), batch_size=track.sft_batch,
                         max_length=512, seed=seed)
    history = History(run_dir / "snapshots" if snapshots else None)
    # the validation before training (step 0) is not seen by the callback (it runs in fit only), so the peak is an SFT checkpoint
    turning = DiversityEarlyStopping(monitor=["val/gen_entropy", "val/self_bleu"], patience=track.turning_point_patience, stop=False,
                                     dirpath=str(run_dir / "turning_point"), save_weights_only=True)
    length = ({"max_epochs": track.sft_epochs, "check_val_every_n_epoch": track.val_every_epochs} if max_steps is None else
              {"max_steps": max_steps, "max_epochs": -1, "val_check_interval": val_every_steps, "check_val_every_n_epoch": None})
    fit = trainer(run_dir, "logs", **length, gradient_clip_val=1.0, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[history, turning])
    started = time.perf_counter()
    fit.validate(module, datamodule=data, verbose=False)  # step 0: the starting model (base) on the same metrics
    fit.fit(module, datamodule=data)
    module.export_hf(run_dir / "final")
    summary = json.loads((run_dir / "turning_point" / "turning_point.json").read_text())
    return {"loss": loss, "tau": tau, "seed": seed, "history": history.rows, "final_step": fit.global_step,
            "turning_point": {"step": summary.get("peak", {}).get("step"), "fired": summary.get("turning_point") is not None,
                              "summary": summary},
            "train_seconds": time.perf_counter() - started}


def grpo_config(track: Track):
    from aesl_lightning.modules.grpo_config import GRPOConfig

    return GRPOConfig(num_generations=track.num_generations, temperature=1.0, max_new_tokens=track.max_new_tokens, beta=track.beta,
                      epsilon=0.2, epsilon_high=0.28, loss_type="dr_grpo", scale_rewards="group", log_completions_every_n_steps=10,
                      reward_funcs=["aesl_lightning.scoring.rewards.math_accuracy", "aesl_lightning.scoring.rewards.boxed_format"], reward_weights=[1.0, 0.1])


def _evaluation(track: Track):
    from aesl_lightning.modules.grpo_config import GRPOEvaluation

    return GRPOEvaluation(num_samples=track.eval_samples, temperature=1.0, max_new_tokens=track.max_new_tokens, greedy=True,
                          num_text_samples=2)


def run_grpo(track: Track, *, run_dir: Path, data_dir: Path, start: str, seed: int, steps: int,
             splits: tuple[str, ...] = ("test", "test_hard")) -> dict:
    """GRPO from `start` on `<data_dir>/rl.jsonl` for `steps` steps, then `evaluate` on `splits`."""
    import lightning as L

    from aesl_lightning import GRPOModule, LoRAConfig, PromptDataModule

    shutil.rmtree(run_dir, ignore_errors=True)
    L.seed_everything(seed, workers=True, verbose=False)
    lora = LoRAConfig(r=track.lora_rank) if track.lora_rank else None
    module = GRPOModule(name_or_path=start, grpo=grpo_config(track), evaluation=_evaluation(track), lr=track.grpo_lr, scheduler="constant",
                        lora=lora)
    data = PromptDataModule(train=str(data_dir / "rl.jsonl"), val_size=0, batch_size=track.grpo_prompts, max_prompt_length=512, seed=seed)
    fit = trainer(run_dir, "logs", max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    history = TrainLog()
    fit.callbacks.append(history)
    started = time.perf_counter()
    fit.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - started
    results = evaluate(module, data_dir, run_dir, splits)
    return {"start": start, "seed": seed, "steps": fit.global_step, "train": history.summary(), "eval": results,
            "train_seconds": train_seconds, "seconds": time.perf_counter() - started}


def evaluate(module, data_dir: Path, run_dir: Path, splits: tuple[str, ...]) -> dict:
    """Greedy accuracy, pass@1 and pass@k (and the samples' diversity) of `module` on each test split."""
    from aesl_lightning import PromptDataModule

    results = {}
    for split in splits:
        eval_data = PromptDataModule(train=None, test=str(data_dir / f"{split}.jsonl"), val_size=0, eval_batch_size=64, max_prompt_length=512)
        (metrics,) = trainer(run_dir, f"eval_{split}").test(module, datamodule=eval_data, verbose=False)
        results[split] = {k.removeprefix("test/"): float(v) for k, v in metrics.items()}
    return results


def run_start_eval(track: Track, *, run_dir: Path, data_dir: Path, start: str, seed: int) -> dict:
    """The starting point of an arm on the test splits before RL (same evaluation as after RL): the RL gain."""
    import lightning as L

    from aesl_lightning import GRPOModule

    shutil.rmtree(run_dir, ignore_errors=True)
    L.seed_everything(seed, workers=True, verbose=False)
    module = GRPOModule(name_or_path=start, evaluation=_evaluation(track), grpo=grpo_config(track))
    return {"start": start, "seed": seed, "eval": evaluate(module, data_dir, run_dir, ("test", "test_hard"))}
