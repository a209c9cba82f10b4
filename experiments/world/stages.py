"""The strategy world's stages, each run through the toolkit itself (SFTModule, GRPOModule, Lightning).

- `write_data`: the fixed splits and every seed's cold starts as JSONL under the work folder;
- `pretrain_base`: a small Llama-architecture model trained from scratch on the native-format corpus;
- `run_sft`: one cold-start SFT run, evaluated at step 0 and on the log-spaced grid, a Hugging Face snapshot at
  every grid point (so RL can start from any of them once the report's rules have picked one);
- `run_grpo`: GRPO from a snapshot with reward = correct answer in the target format, then the test evaluation.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from aesl_lightning.data.jsonl import write_jsonl
from aesl_lightning.data.strategy_world import WorldConfig, coldstart, fixed_splits
from world.evaluate import columns, evaluate, summarise


def world_config(cfg: dict) -> WorldConfig:
    w = cfg["world"]
    return WorldConfig(pretrain_size=w["pretrain_size"], pretrain_mix=tuple(w["pretrain_mix"]), target_share=w.get("target_share", 0.0),
                       coldstart_size=w["coldstart_size"],
                       val_size=w["val_size"], rl_size=w["rl_size"], test_size=w["test_size"], data_seed=w["data_seed"])


def write_data(cfg: dict, work: Path) -> dict[str, Path]:
    """JSONL files of the shared splits (idempotent: same config, same bytes)."""
    data = work / "data"
    paths = {name: data / f"{name}.jsonl" for name in ("pretrain", "pretrain_val", "val", "rl", "test")}
    if not all(p.exists() for p in paths.values()):
        for name, records in fixed_splits(world_config(cfg)).items():
            write_jsonl(records, paths[name])
    return paths


def coldstart_file(cfg: dict, work: Path, variant: str, seed: int) -> Path:
    strategies = cfg["coldstarts"][variant]
    path = work / "data" / f"coldstart-{variant}-n{cfg['world']['coldstart_size']}-s{seed}.jsonl"
    if not path.exists():
        write_jsonl(coldstart(world_config(cfg), seed, strategies), path)
    return path


def _trainer(run_dir: Path, **kwargs):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=TensorBoardLogger(save_dir=str(run_dir), name="logs", version=""),
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
                     enable_checkpointing=False, **kwargs)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def pretrain_base(cfg: dict, work: Path) -> dict:
    """Pre-train the base (CE on every token of the native-format completions) and evaluate it on `val`."""
    import lightning as L

    from aesl_lightning import LossConfig, SFTDataModule, SFTModule
    from aesl_lightning.infra.tiny import char_tokenizer, tiny_model
    from aesl_lightning.modules.evaluation import ValidationGeneration

    b = cfg["base"]
    paths = write_data(cfg, work)
    out = work / "base"
    init = work / "base-init"
    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=b["seed"], vocab_size=len(tokenizer), hidden_size=b["hidden_size"], num_layers=b["num_layers"],
                       intermediate_size=b["intermediate_size"], num_heads=b["num_heads"], num_kv_heads=b["num_kv_heads"])
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    L.seed_everything(b["seed"], workers=True, verbose=False)
    module = SFTModule(name_or_path=str(init), loss=LossConfig(name="ce"), lr=b["lr"], warmup_steps=0.05, scheduler="cosine",
                       weight_decay=0.01, histogram_every_n_steps=0, val_generation=ValidationGeneration(num_prompts=0, num_samples=0))
    data = SFTDataModule(train=str(paths["pretrain"]), val=str(paths["pretrain_val"]), batch_size=b["batch_size"], max_length=256, seed=b["seed"])
    every = b.get("snapshot_every")
    steps = list(range(b.get("snapshot_from", every or 0), b["steps"] + 1, every)) if every else []
    snapshots = work / "base-snapshots"
    shutil.rmtree(snapshots, ignore_errors=True)  # what an interrupted attempt of this unit left (under the work folder only)
    trainer = _trainer(work / "base-run", max_steps=b["steps"], gradient_clip_val=1.0, val_check_interval=b["steps"], check_val_every_n_epoch=None,
                       callbacks=[SnapshotAt(steps, snapshots)] if steps else [])
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - began
    result = {"parameters": sum(p.numel() for p in module.model.parameters()), "steps": trainer.global_step, "train_seconds": seconds,
              "val_loss": float(trainer.callback_metrics["val/loss"])}
    if steps:  # amendment 5: check every snapshot, the base is the first that qualifies
        from world.analysis import choose_base

        checks = []
        for step in steps:
            rows = evaluate_dir(cfg, snapshots / f"step{step:05d}", _read_jsonl(paths["val"]), samples=cfg["eval"]["samples"], seed=0)
            checks.append({"step": step, "summary": summarise(rows)})
        chosen = choose_base(checks)
        result.update(snapshot_checks=checks, chosen_step=chosen)
        shutil.copytree(snapshots / f"step{(chosen or b['steps']):05d}", out, dirs_exist_ok=True)
    else:
        module.export_hf(out)
    shutil.rmtree(init, ignore_errors=True)
    return result


class SnapshotAt(Callback):
    """A Hugging Face export of the model at each of `steps` (training-step count)."""

    def __init__(self, steps: list[int], folder: Path) -> None:
        self.steps, self.folder = set(steps), folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            pl_module.export_hf(self.folder / f"step{trainer.global_step:05d}")


def evaluate_dir(cfg: dict, model_dir: Path, problems: list[dict], samples: int, seed: int) -> list[dict]:
    model, tokenizer = _load(model_dir)
    model.eval()
    return evaluate(model, tokenizer, problems, samples=samples, max_new_tokens=cfg["eval"]["max_new_tokens"], seed=seed)


def base_check(cfg: dict, work: Path) -> dict:
    """M1 / M2 on the base: strategy shares and success among k samples, and the target-format rate."""
    paths = write_data(cfg, work)
    rows = evaluate_dir(cfg, work / "base", _read_jsonl(paths["val"]), samples=cfg["eval"]["samples"], seed=0)
    return {"summary": summarise(rows), "columns": columns(rows)}


class GridEvaluation(Callback):
    """Evaluate on `val` and save a snapshot at step 0 and at every step of `grid` (training-step count)."""

    def __init__(self, cfg: dict, problems: list[dict], grid: list[int], snapshots: Path, seed: int) -> None:
        self.cfg, self.problems, self.grid, self.snapshots, self.seed = cfg, problems, sorted(set(grid)), snapshots, seed
        self.rows: list[dict] = []

    def evaluate_now(self, module, step: int) -> None:
        began = time.perf_counter()
        rows = evaluate(module.model, module.tokenizer, self.problems, samples=self.cfg["eval"]["samples"],
                        max_new_tokens=self.cfg["eval"]["max_new_tokens"], seed=self.seed * 1000 + step)
        module.export_hf(self.snapshots / f"step{step:05d}")
        self.rows.append({"step": step, "summary": summarise(rows), "columns": columns(rows), "seconds": time.perf_counter() - began})

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 in self.grid and trainer.global_step == 0:
            self.evaluate_now(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.grid:
            self.evaluate_now(pl_module, trainer.global_step)


def run_sft(cfg: dict, work: Path, variant: str, loss: str, seed: int, run_id: str) -> dict:
    """One cold-start SFT run on cold start `variant` of seed `seed` with `loss`, evaluated on `val` at step 0 and
    at every grid step, with a snapshot at each (under `<work>/runs/<run_id>/snapshots/stepNNNNN`)."""
    import lightning as L

    from aesl_lightning import LossConfig, SFTDataModule, SFTModule
    from aesl_lightning.modules.evaluation import ValidationGeneration

    s = cfg["sft"]
    run_dir = work / "runs" / run_id
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt of this unit left (under the work folder only)
    train = coldstart_file(cfg, work, variant, seed)
    problems = _read_jsonl(write_data(cfg, work)["val"])[: cfg["eval"].get("val_problems")]
    L.seed_everything(seed, workers=True, verbose=False)
    module = SFTModule(name_or_path=str(work / "base"), loss=LossConfig(name=loss, **s.get("loss_args", {}).get(loss, {})), lr=s["lr"],
                       warmup_steps=s.get("warmup_steps", 0), scheduler="constant", histogram_every_n_steps=0,
                       val_generation=ValidationGeneration(num_prompts=0, num_samples=0))
    data = SFTDataModule(train=str(train), val_size=0, batch_size=s["batch_size"], max_length=256, seed=seed)
    grid = GridEvaluation(cfg, problems, s["grid"], run_dir / "snapshots", seed)
    trainer = _trainer(run_dir, max_steps=max(s["grid"]), max_epochs=-1, gradient_clip_val=1.0, limit_val_batches=0, callbacks=[grid])
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"variant": variant, "loss": loss, "seed": seed, "seconds": time.perf_counter() - began,
            "eval_seconds": sum(r["seconds"] for r in grid.rows), "grid": grid.rows}


def _recording_grpo():
    """GRPOModule that keeps, per rollout batch, each prompt's rewards and its completions' strategies
    (the per-prompt record of the manipulation check and of the strategy shares during RL)."""
    from aesl_lightning import GRPOModule
    from aesl_lightning.data.strategy_world import label_strategy

    class RecordingGRPO(GRPOModule):
        def make_rollout(self, batch, timer=None):
            rollout = super().make_rollout(batch, timer)
            g = self.grpo.num_generations
            rewards = rollout.rewards[:, 0].tolist()
            texts = rollout.generation.texts
            self.records.append([{"a": a, "b": b, "rewards": rewards[i * g:(i + 1) * g],
                                  "strategies": [label_strategy(t) for t in texts[i * g:(i + 1) * g]]}
                                 for i, (a, b) in enumerate(zip(batch["a"], batch["b"]))])
            return rollout

    return RecordingGRPO


def run_grpo(cfg: dict, work: Path, start: Path, seed: int, run_id: str, evaluate_test: bool = True) -> dict:
    """GRPO from `start` (a snapshot folder) over the RL pool for `passes` passes, then the test evaluation."""
    import lightning as L

    from aesl_lightning import PromptDataModule
    from aesl_lightning.modules.grpo_config import GRPOConfig

    r = cfg["rl"]
    run_dir = work / "runs" / run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    paths = write_data(cfg, work)
    pool = run_dir / "pool.jsonl"
    write_jsonl(_read_jsonl(paths["rl"])[: r["pool_size"]], pool)
    L.seed_everything(seed, workers=True, verbose=False)
    grpo = GRPOConfig(num_generations=r["num_generations"], temperature=1.0, max_new_tokens=cfg["eval"]["max_new_tokens"], beta=r["beta"],
                      epsilon=0.2, epsilon_high=0.28, loss_type=r["loss_type"], scale_rewards="group", log_completions_every_n_steps=0,
                      reward_funcs=["aesl_lightning.data.strategy_world.target_reward"])
    module = _recording_grpo()(name_or_path=str(start), grpo=grpo, lr=r["lr"], scheduler="constant", warmup_steps=0)
    module.records = []
    test = _read_jsonl(paths["test"])
    before = time.perf_counter()
    rows = evaluate(module.model.eval(), module.tokenizer, test, samples=cfg["eval"]["test_samples"], max_new_tokens=cfg["eval"]["max_new_tokens"],
                    seed=seed)
    start_test = {"summary": summarise(rows), "columns": columns(rows), "seconds": time.perf_counter() - before}
    data = PromptDataModule(train=str(pool), val_size=0, test_size=0, batch_size=r["prompts_per_step"], max_prompt_length=128, seed=seed)
    steps = r["passes"] * r["pool_size"] // r["prompts_per_step"]
    trainer = _trainer(run_dir, max_steps=steps, max_epochs=-1, limit_val_batches=0)
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - began
    out = {"seed": seed, "start": str(start.relative_to(work)), "steps": trainer.global_step, "train_seconds": train_seconds, "start_test": start_test,
           "per_step": [[{"a": x["a"], "b": x["b"], "reward": sum(x["rewards"]) / len(x["rewards"]),
                          "strategies": {s: x["strategies"].count(s) for s in set(x["strategies"])}} for x in batch] for batch in module.records]}
    if evaluate_test:
        began = time.perf_counter()
        module.model.eval()
        rows = evaluate(module.model, module.tokenizer, test, samples=cfg["eval"]["test_samples"],
                        max_new_tokens=cfg["eval"]["max_new_tokens"], seed=seed)
        out.update(test={"summary": summarise(rows), "columns": columns(rows)}, eval_seconds=time.perf_counter() - began)
    return out
