"""The real study's stages, each run through the toolkit itself (SFTModule, GRPOModule, the data modules, Lightning).

- `write_data`: the word-problem splits (data seed 0) as JSONL under the work folder;
- `base_test`: the base model on the test problems, greedy;
- `run_sft`: one cold-start SFT run evaluated on the validation grid (greedy + k samples), a Hugging Face snapshot
  at each grid point of which only those the rules can pick are kept (best accuracy, the paper's peak, the end);
- `restore_sft`: the snapshots of a recorded SFT unit rebuilt after the work folder was lost, checked against
  the record;
- `run_screen`: k samples per RL prompt from a snapshot, the pool of prompts solved 1..k-1 times;
- `run_grpo`: GRPO over the pool in a fixed order, each prompt's rewards recorded at every step, test before / after.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from real import rules
from real.evaluate import evaluate


def quiet(threads: int | None = None) -> None:
    """Fewer library messages in the logs; `threads` torch threads if given."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_source(cfg: dict, work: Path) -> str:
    """The base model: a built-in name, a folder or a hub id; `tiny` (smoke runs) is a tiny Llama with the character
    tokenizer (`aesl_lightning.infra.tiny`) written once under the work folder."""
    if cfg["model"] != "tiny":
        return cfg["model"]
    path = work / "tiny-base"
    if not (path / "config.json").is_file():
        from aesl_lightning.infra.tiny import char_tokenizer, tiny_model

        tokenizer = char_tokenizer()
        tiny_model("llama", seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def write_data(cfg: dict, work: Path) -> dict[str, Path]:
    """`<work>/data/<split>.jsonl` for coldstart, val, rl and test (rewritten only when the sizes change)."""
    from aesl_lightning.data.word_problems import EASY, make_splits, write_splits

    d = cfg["data"]
    sizes = {name: d[name] for name in ("coldstart", "val", "rl", "test")}
    folder = work / "data"
    stamp = folder / "sizes.json"
    paths = {name: folder / f"{name}.jsonl" for name in sizes}
    wanted = {"sizes": sizes, "seed": d["seed"], "instruction": d["instruction"]}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted and all(p.is_file() for p in paths.values())):
        easy = EASY.__class__(**{**vars(EASY), "instruction": d["instruction"]})
        write_splits(make_splits(sizes, seed=d["seed"], easy=easy), folder)
        stamp.write_text(json.dumps(wanted))
    return paths


def _trainer(cfg: dict, run_dir: Path, **kwargs):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    m = cfg["machine"]
    return L.Trainer(accelerator=m["accelerator"], devices=1, precision=m["precision"],
                     logger=TensorBoardLogger(save_dir=str(run_dir), name="logs", version=""), enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, enable_checkpointing=False, **kwargs)


def _eval_device(cfg: dict):
    import torch

    return torch.device("cuda") if cfg["machine"]["accelerator"] != "cpu" and torch.cuda.is_available() else torch.device("cpu")


def test_eval(cfg: dict, work: Path, model, tokenizer) -> dict:
    """Greedy decoding on the first `eval.test_problems` test problems (the primary endpoint)."""
    e = cfg["eval"]
    model.to(_eval_device(cfg)).eval()
    return evaluate(model, tokenizer, write_data(cfg, work)["test"], samples=0, max_new_tokens=e["max_new_tokens"], seed=0,
                    batch_size=e["batch_size"], limit=e["test_problems"])


def _load(path: str):
    from aesl_lightning.infra.models import load_causal_lm, load_tokenizer

    return load_causal_lm(path), load_tokenizer(path)


def base_test(cfg: dict, work: Path) -> dict:
    model, tokenizer = _load(model_source(cfg, work))
    return {"test": test_eval(cfg, work, model, tokenizer)}


def snapshot_dir(work: Path, unit_id: str, step: int) -> Path:
    return work / "runs" / unit_id / "snapshots" / f"step{step:05d}"


def _grid_callback(cfg: dict, work: Path, unit_id: str, seed: int, grid: list[int], prune: bool):
    from lightning.pytorch.callbacks import Callback

    e = cfg["eval"]
    val = write_data(cfg, work)["val"]

    class GridEvaluation(Callback):
        """Evaluate on the validation problems at step 0 (before any update) and at every grid step, export a snapshot
        there, and delete the snapshots no rule can pick any more."""

        def __init__(self) -> None:
            self.rows: list[dict] = []

        def evaluate_now(self, trainer, module) -> None:
            step = trainer.global_step
            device = _eval_device(cfg)
            module.model.to(device)
            out = evaluate(module.model, module.tokenizer, val, samples=e["samples"], max_new_tokens=e["max_new_tokens"],
                           seed=seed * 1000 + step, batch_size=e["batch_size"], limit=e["val_problems"])
            loss = trainer.callback_metrics.get("train/loss")
            self.rows.append({"step": step, "columns": out["columns"], "summary": out["summary"], "seconds": out["seconds"],
                              "train_loss": float(loss) if loss is not None and step > 0 else None, "examples": out["examples"][:1]})
            module.export_hf(snapshot_dir(work, unit_id, step), overwrite=True)
            if prune:
                keep = set(rules.chosen_steps(self.rows, cfg["c1"]["format_level"], final=False).values())
                for row in self.rows[:-1]:
                    if row["step"] not in keep:
                        shutil.rmtree(snapshot_dir(work, unit_id, row["step"]), ignore_errors=True)

        def on_train_start(self, trainer, module) -> None:
            if trainer.global_step == 0 and 0 in grid:
                self.evaluate_now(trainer, module)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step in grid and (not self.rows or self.rows[-1]["step"] != trainer.global_step):
                self.evaluate_now(trainer, module)

    return GridEvaluation()


def _sft_run(cfg: dict, work: Path, run_dir: Path, loss: dict, seed: int, callback):
    """The cold-start SFT run of a unit (module, data, trainer), seeded: the same `loss` and `seed` give the same
    weights at every step (on the same machine and library versions)."""
    import lightning as L

    from aesl_lightning import LossConfig, SFTDataModule, SFTModule
    from aesl_lightning.modules.evaluation import ValidationGeneration

    s = cfg["sft"]
    paths = write_data(cfg, work)
    L.seed_everything(seed, workers=True, verbose=False)
    module = SFTModule(name_or_path=model_source(cfg, work), loss=LossConfig(**loss), lr=s["lr"], warmup_steps=s["warmup_steps"],
                       scheduler=s["scheduler"], histogram_every_n_steps=0,
                       val_generation=ValidationGeneration(num_prompts=0, num_samples=0, kl_to_base=False))
    data = SFTDataModule(train=str(paths["coldstart"]), val_size=0, batch_size=s["batch_size"], max_length=512, seed=seed)
    trainer = _trainer(cfg, run_dir, max_steps=s["max_steps"], max_epochs=-1, gradient_clip_val=1.0, limit_val_batches=0, callbacks=[callback])
    return module, data, trainer


def run_sft(cfg: dict, work: Path, unit_id: str, loss: dict, seed: int, grid: list[int]) -> dict:
    """Cold-start SFT of the base with `loss` (LossConfig fields) for `sft.max_steps`, evaluated at every step of `grid`
    (a snapshot each; with a grid of more than one point only the snapshots the rules pick are kept)."""
    run_dir = work / "runs" / unit_id
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt of this unit left
    callback = _grid_callback(cfg, work, unit_id, seed, grid, prune=len(grid) > 1)
    module, data, trainer = _sft_run(cfg, work, run_dir, loss, seed, callback)
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - began
    keep = rules.chosen_steps(callback.rows, cfg["c1"]["format_level"], final=True) if len(grid) > 1 else {"end": grid[-1]}
    kept = sorted({v for v in keep.values() if v is not None})
    for row in callback.rows:
        if row["step"] not in kept:
            shutil.rmtree(snapshot_dir(work, unit_id, row["step"]), ignore_errors=True)
    return {"loss": loss, "seed": seed, "steps": trainer.global_step, "seconds": seconds, "eval_seconds": sum(r["seconds"] for r in callback.rows),
            "grid": callback.rows, "snapshots": {k: v for k, v in keep.items() if v is not None}}


GREEDY_CHECK = ("greedy_correct", "greedy_boxed", "greedy_tokens")
RESTORED = "restored.json"


def restore_sft(cfg: dict, work: Path, unit_id: str, result: dict, steps: list[int], log=print) -> dict:
    """Rebuild the snapshots at `steps` of the recorded SFT unit `unit_id` (its record's `result`) when the work folder
    that held them is gone (a new machine, a cleaned disk): the same run (loss, seed, data order, schedule over
    `sft.max_steps`) up to the last of `steps`, without the grid's evaluations, which move no random state
    (`evaluate` forks it). Each snapshot is checked against the record: greedy decoding of the validation problems
    must reproduce the recorded per-problem correctness, boxing and length (`GREEDY_CHECK`); otherwise no snapshot is
    written and a `RuntimeError` names the unit, step and how many problems differ. Writes `restored.json` (the
    check) into each snapshot and returns `{step: check}`."""
    rows = {row["step"]: row for row in result["grid"]}
    missing = [step for step in steps if step not in rows]
    if missing:
        raise ValueError(f"{unit_id}: steps {missing} were not evaluated in the recorded run (grid {sorted(rows)}), so no "
                         "snapshot there can be checked")
    last = max(steps)
    val = write_data(cfg, work)["val"]
    from lightning.pytorch.callbacks import Callback

    class Restore(Callback):
        def __init__(self) -> None:
            self.checks: dict[int, dict] = {}

        def on_train_start(self, trainer, module) -> None:
            if 0 in steps:
                self.checks[0] = _restore_check(cfg, module, val, unit_id, 0, rows[0], work)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step in steps and step not in self.checks:
                self.checks[step] = _restore_check(cfg, module, val, unit_id, step, rows[step], work)
            if step >= last:
                trainer.should_stop = True

    callback = Restore()
    began = time.perf_counter()
    module, data, trainer = _sft_run(cfg, work, work / "runs" / unit_id / "restore", result["loss"], result["seed"], callback)
    trainer.fit(module, datamodule=data)
    log(f"[restored] {unit_id} steps {sorted(callback.checks)} in {(time.perf_counter() - began) / 60:.1f} min, greedy validation "
        "identical to the record")
    return callback.checks


def _restore_check(cfg: dict, module, val: Path, unit_id: str, step: int, row: dict, work: Path) -> dict:
    e = cfg["eval"]
    path = snapshot_dir(work, unit_id, step)
    module.model.to(_eval_device(cfg))
    out = evaluate(module.model, module.tokenizer, val, samples=0, max_new_tokens=e["max_new_tokens"], seed=0, batch_size=e["batch_size"],
                   limit=e["val_problems"])
    recorded = row["columns"]
    if out["columns"]["id"] != recorded["id"]:
        raise RuntimeError(f"{unit_id}: the validation problems differ from those of the record (data settings changed?)")
    differ = sum(any(out["columns"][k][i] != recorded[k][i] for k in GREEDY_CHECK) for i in range(len(recorded["id"])))
    if differ:
        raise RuntimeError(f"{unit_id}: the rebuilt step-{step} weights decode {differ} of {len(recorded['id'])} validation problems "
                           "differently from the record (another machine or library version?); no snapshot was kept: rerun the "
                           "unit instead (move its record aside)")
    module.export_hf(path, overwrite=True)
    check = {"unit": unit_id, "step": step, "problems": len(recorded["id"]), "greedy_identical": list(GREEDY_CHECK),
             "greedy_accuracy": out["summary"]["greedy_accuracy"]}
    (path / RESTORED).write_text(json.dumps(check, indent=1) + "\n")
    return check


def run_screen(cfg: dict, work: Path, start: Path) -> dict:
    """`screen.samples` completions for each of the first `screen.prompts` RL prompts; the pool is the first
    `screen.pool` prompts solved `screen.min_solved`..`screen.max_solved` times (fewer if fewer qualify)."""
    c, e = cfg["screen"], cfg["eval"]
    model, tokenizer = _load(str(start))
    model.to(_eval_device(cfg)).eval()
    out = evaluate(model, tokenizer, write_data(cfg, work)["rl"], samples=c["samples"], max_new_tokens=e["max_new_tokens"], seed=0,
                   batch_size=e["batch_size"], limit=c["prompts"], greedy=False)
    cols = out["columns"]
    qualifying = [i for i, n in zip(cols["id"], cols["correct"]) if c["min_solved"] <= n <= c["max_solved"]]
    return {"columns": {k: cols[k] for k in ("id", "correct", "boxed")}, "summary": out["summary"], "seconds": out["seconds"],
            "qualifying": len(qualifying), "pool": qualifying[: c["pool"]]}


def _recording_grpo():
    """GRPOModule that keeps, at every step, each prompt's rewards and its completions' entropy and length."""
    from aesl_lightning import GRPOModule

    class RecordingGRPO(GRPOModule):
        def make_rollout(self, batch, timer=None):
            rollout = super().make_rollout(batch, timer)
            self._last = (list(batch["key"]), rollout)
            return rollout

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(outputs, batch, batch_idx)
            keys, rollout = self._last
            g, gen = self.grpo.num_generations, rollout.generation
            rewards = rollout.rewards.nan_to_num(0.0).cpu()
            mask = gen.completion_mask.float().cpu()
            entropy = gen.entropy.float().cpu() * mask if gen.entropy is not None else mask * math.nan
            self.records.append([{"id": key, "correct": [int(x) for x in rewards[i * g:(i + 1) * g, 0].tolist()],
                                  "boxed": [int(x) for x in rewards[i * g:(i + 1) * g, 1].tolist()],
                                  "entropy_sum": round(float(entropy[i * g:(i + 1) * g].sum()), 4),
                                  "tokens": int(mask[i * g:(i + 1) * g].sum())} for i, key in enumerate(keys)])

    return RecordingGRPO


def run_grpo(cfg: dict, work: Path, unit_id: str, start: str, seed: int, settings: dict, pool: list[str], start_test: dict | None) -> dict:
    """GRPO from `start` over the pool (`pool`: prompt keys, in this order every pass) for `passes` passes, with the
    `rl` settings overridden by `settings`; the test evaluation before (`start_test` if already measured) and after."""
    import lightning as L

    from aesl_lightning import PromptDataModule
    from aesl_lightning.modules.grpo_config import GRPOConfig, GRPOEvaluation

    r = {**cfg["rl"], **settings}
    run_dir = work / "runs" / unit_id
    shutil.rmtree(run_dir, ignore_errors=True)
    records = {json.loads(line)["key"]: line for line in write_data(cfg, work)["rl"].read_text().splitlines() if line.strip()}
    run_dir.mkdir(parents=True)
    pool_file = run_dir / "pool.jsonl"
    pool_file.write_text("".join(records[k] + "\n" for k in pool))
    L.seed_everything(seed, workers=True, verbose=False)
    grpo = GRPOConfig(num_generations=r["num_generations"], temperature=1.0, max_new_tokens=r["max_new_tokens"], beta=r["beta"], epsilon=0.2,
                      epsilon_high=0.28, loss_type=r["loss_type"], scale_rewards="group", log_completions_every_n_steps=0,
                      reward_funcs=["aesl_lightning.scoring.rewards.math_accuracy", "aesl_lightning.scoring.rewards.boxed_format"],
                      reward_weights=list(r["reward_weights"]))
    checkpointing = bool(cfg["machine"].get("gradient_checkpointing", False))  # memory only: the same gradients
    module = _recording_grpo()(name_or_path=start, grpo=grpo, evaluation=GRPOEvaluation(num_samples=0, greedy=False), lr=r["lr"],
                               scheduler="constant", warmup_steps=0, gradient_checkpointing=checkpointing)
    module.records = []
    before = start_test or test_eval(cfg, work, module.model, module.tokenizer)
    data = PromptDataModule(train=str(pool_file), val_size=0, test_size=0, batch_size=r["prompts_per_step"], max_prompt_length=512,
                            shuffle=False, seed=seed)
    steps = r["passes"] * math.ceil(len(pool) / r["prompts_per_step"])
    trainer = _trainer(cfg, run_dir, max_steps=steps, max_epochs=-1, limit_val_batches=0)
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - began
    after = test_eval(cfg, work, module.model, module.tokenizer)
    return {"start": start, "seed": seed, "settings": r, "steps": trainer.global_step, "train_seconds": train_seconds, "pool": len(pool),
            "gradient_checkpointing": checkpointing, "per_step": module.records, "start_test": before, "test": after}
