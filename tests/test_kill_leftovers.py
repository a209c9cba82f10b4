"""What a kill leaves behind: the step-0 statistics are already on disk, and the resumed run removes the unfinished
exports and checkpoint writes the killed run left beside its checkpoint (only the toolkit's own)."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from aesl_lightning.data.datamodule import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.export import EXPORT_INFO_FILE
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration


class Killed(RuntimeError):
    pass


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def fit(tmp_path, max_steps, kill_at=None, ckpt_path=None):
    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, gate_check_batches=1,
                       val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=40), val_size=4, batch_size=4,
                         max_length=400)
    logger = TensorBoardLogger(tmp_path / "logs", name="run")
    callbacks = [ModelCheckpoint(every_n_train_steps=1, save_last=True)] + ([KillAt(kill_at)] if kill_at else [])
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, log_every_n_steps=1)
    try:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return trainer, tmp_path / "logs" / "run" / f"version_{logger.version}"


def test_step0_share_survives_a_kill_and_a_resume_removes_the_killed_runs_leftovers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = fit(tmp_path, max_steps=5, kill_at=2)
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert "train/learned_share_step0" in events.Tags()["scalars"]  # before any epoch ended
    assert [e.step for e in events.Scalars("train/learned_share_step0")] == [0]

    dead = _dead_pid()
    leftovers, kept = [], []
    for folder in (run, run / "turning_point"):
        folder.mkdir(exist_ok=True)
        ours = folder / f".hf_model.tmp-{dead}-0123abcd"  # a killed final export: our name and marker
        ours.mkdir()
        (ours / EXPORT_INFO_FILE).write_text('{"exported_by": "aesl-lightning 0.1.0", "status": "incomplete"}')
        (ours / "model.safetensors").write_bytes(b"half")
        leftovers.append(ours)
        mine = folder / f".hf_model.tmp-{dead}-0123abce"  # our name, a user's content: never deleted
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
        kept.append(mine)
    checkpoints = run / "checkpoints"
    half = checkpoints / f".last.ckpt.aesl-tmp-{dead}-0123abcd"  # a checkpoint write killed mid-way
    half.write_bytes(b"PK\x03\x04half")
    leftovers.append(half)
    kept.append(checkpoints / "notes.aesl-tmp")
    kept[-1].write_text("mine")

    trainer, _ = fit(tmp_path, max_steps=3, ckpt_path=checkpoints / "last.ckpt")
    assert trainer.global_step == 3
    assert [p for p in leftovers if os.path.exists(p)] == []
    assert all(p.exists() for p in kept)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
