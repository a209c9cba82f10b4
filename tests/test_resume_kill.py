"""kill -9 matrix: a seeded tiny SFT run with the turning-point callback is killed with SIGKILL mid-epoch, during
a validation, while a checkpoint is being written and during the peak export, resumed each time from its newest
checkpoint, and must end exactly like the uninterrupted run: bit-identical final weights, the same logged
training losses, the same turning-point history and decision, the same exported peak, and no leftovers.

Run as a script (`python tests/test_resume_kill.py ROOT [KILL]`), this file is the training process itself.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 5  # 20 examples, batches of 4
PEAK, PATIENCE = 12, 3  # the scripted diversity rises to step 12, then falls: stop at 12 + 2 * PATIENCE


def entropy(step: int) -> float:
    return 1.0 + step / 4 if step <= PEAK else 4.0 - (step - PEAK) / 4


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def train(root: Path, kill: str | None) -> None:
    """One process: resume from the newest checkpoint under `root/ckpts` if any; SIGKILL itself at `kill`."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from aesl_lightning.infra import export
    from aesl_lightning.data.datamodule import SFTDataModule
    from aesl_lightning.data.synthetic import ArithmeticConfig
    from aesl_lightning.training.early_stopping import DiversityEarlyStopping
    from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

    torch.set_num_threads(1)
    kind, _, at = (kill or "none:-1").partition(":")
    at = int(at)

    class Scripted(SFTModule):
        def on_validation_epoch_end(self) -> None:
            super().on_validation_epoch_end()
            if not self.trainer.sanity_checking:
                self.log("val/gen_entropy", entropy(self.global_step))

        def validation_step(self, batch, batch_idx):
            if kind == "val" and self.global_step == at:
                _die()
            return super().validation_step(batch, batch_idx)

    class Killer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if kind == "train" and trainer.global_step == at:
                _die()  # before this step's checkpoint (ModelCheckpoint runs last)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            if kind == "save" and trainer.global_step == at:
                _die()  # while the checkpoint of this step is being put together

    if kind == "export":
        write_info = export.write_info

        def dying_write_info(out_dir, **info):
            write_info(out_dir, **info)
            _die()  # the export is complete in its temporary folder, not yet renamed into place

        export.write_info = dying_write_info

    L.seed_everything(0)
    module = Scripted("tiny-llama", lr=1e-2, warmup_steps=0, scheduler="linear",
                      val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=20), val_size=4, batch_size=4,
                         max_length=400, seed=3)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=1, save_top_k=-1, save_last=True,
                                  filename="{step}")
    turning = DiversityEarlyStopping(monitor="val/gen_entropy", smoothing="none", patience=PATIENCE)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=8, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        callbacks=[Killer(), turning, checkpoints], logger=CSVLogger(root, name="logs", flush_logs_every_n_steps=1),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    last = root / "ckpts" / "last.ckpt"
    trainer.fit(module, data, ckpt_path=last if last.exists() else None)
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, root / "final.pt")
    (root / "result.json").write_text(json.dumps({
        "global_step": trainer.global_step, "run_dir": str(turning.out_dir),
    }))


# ----------------------------------------------------------------------------------------------------
# The test


def _run(root: Path, kill: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, str(root)] + ([kill] if kill else [])
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600).returncode


def _losses(root: Path) -> dict[int, float]:
    """train/loss by step over every version folder (a resumed run repeats none of the killed run's steps
    that were checkpointed; a step logged twice must agree, which the caller checks through the merge)."""
    import csv

    merged: dict[int, float] = {}
    for metrics in sorted((root / "logs").glob("version_*/metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    step = int(row["step"])
                    merged.setdefault(step, float(row["train/loss"]))
                    assert merged[step] == float(row["train/loss"]), (step, merged[step], row["train/loss"])
    return merged


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_result(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    assert _run(whole, None) == 0
    stop = PEAK + 2 * PATIENCE
    assert json.loads((whole / "result.json").read_text())["global_step"] == stop

    rng = random.Random(14)
    kills = [
        f"train:{rng.choice([s for s in range(1, 9) if s % STEPS_PER_EPOCH])}",  # mid-epoch, between checkpoints
        f"val:{rng.choice(range(10, 15, 2))}",  # inside a validation
        f"save:{rng.choice(range(15, 17))}",  # while a checkpoint is written
        f"export:{stop}",  # while the peak is exported at the turning point
    ]
    kills.sort(key=lambda k: int(k.split(":")[1]))
    killed = tmp_path / "killed"
    for kill in kills:
        assert _run(killed, kill) == -signal.SIGKILL, kill
    assert any(killed.rglob(".hf_model.tmp-*")), "the export kill should have left its temporary folder"
    assert _run(killed, None) == 0

    result = json.loads((killed / "result.json").read_text())
    assert result["global_step"] == stop
    expected, got = torch.load(whole / "final.pt"), torch.load(killed / "final.pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert _losses(killed) == _losses(whole) and len(_losses(whole)) == stop

    summary = {name: json.loads((Path(json.loads((root / "result.json").read_text())["run_dir"]) /
                                 "turning_point.json").read_text()) for name, root in (("whole", whole), ("killed", killed))}
    for key in ("turning_point", "peak", "fired_at", "stopped_at_step", "history"):
        assert summary["killed"][key] == summary["whole"][key], key
    assert summary["killed"]["turning_point"]["step"] == PEAK
    out = Path(result["run_dir"])
    assert summary["killed"]["peak_checkpoint"] == "peak.ckpt" and (out / "peak.ckpt").is_file()
    exported = {n: AutoModelForCausalLM.from_pretrained(Path(json.loads((r / "result.json").read_text())["run_dir"]) / "hf_model")
                for n, r in (("whole", whole), ("killed", killed))}
    a, b = exported["whole"].state_dict(), exported["killed"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed.rglob(".hf_model.tmp-*")) and not list(killed.rglob(".hf_model.old-*"))


if __name__ == "__main__":
    train(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
