"""Checkpoint saves are atomic beside their target, also when the system temp folder is on another filesystem and
when the disk fills up mid-write; `--ckpt_path last` skips an unreadable newest checkpoint for the newest good one."""

import errno
import io
import os
import shutil
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from aesl_lightning.cli import resolve_last_checkpoint
from aesl_lightning.data.datamodule import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration


def _disk_full_after_half(monkeypatch):
    """Every file copy (`shutil.copyfile`, what `shutil.move` falls back to across filesystems) and every
    `torch.save` into a file writes half of its bytes and then fails with ENOSPC, like a full disk."""
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike, io.BytesIO)):
            return real_save(obj, f, *args, **kwargs)  # into memory (Lightning's writer): not the disk
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def half_copy(src, dst, *args, **kwargs):
        with open(src, "rb") as source, open(dst, "wb") as target:
            data = source.read()
            target.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    monkeypatch.setattr(shutil, "copyfile", half_copy)


def _other_filesystem_for_temp(monkeypatch):
    """`os.rename` between different folders fails with EXDEV, as when the temp folder is another filesystem."""
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def _tiny_fit(tmp_path, max_steps):
    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, val_generation=ValidationGeneration(num_prompts=0))
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=8), val_size=4, batch_size=4,
                         max_length=400)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True,
                                  filename="{step}")
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("temp_elsewhere", [True, False])
def test_a_save_failing_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, temp_elsewhere):
    trainer = _tiny_fit(tmp_path, max_steps=2)
    folder = tmp_path / "ckpt"
    before = sorted(p.name for p in folder.iterdir())
    assert before == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"  # installed by the module

    if temp_elsewhere:
        _other_filesystem_for_temp(monkeypatch)
    _disk_full_after_half(monkeypatch)
    for name in ("last.ckpt", "step15.ckpt"):
        with pytest.raises(OSError, match="No space left"):
            trainer.save_checkpoint(folder / name)
    monkeypatch.undo()

    assert sorted(p.name for p in folder.iterdir()) == before  # no partial step15.ckpt, no temporary file
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2


def _checkpoint(path, step, mtime):
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(64)}}, path)
    os.utime(path, (mtime, mtime))


def test_resume_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _checkpoint(folder / "step10.ckpt", 10, 1_000)
    _checkpoint(folder / "last.ckpt", 15, 2_000)
    _checkpoint(folder / "step15.ckpt", 15, 2_001)
    for name in ("last.ckpt", "step15.ckpt"):  # cut short by a kill, or a full disk under another writer
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        os.utime(folder / name, (3_000, 3_000))
    trainer = SimpleNamespace(callbacks=[], logger=None, default_root_dir=str(tmp_path))

    assert resolve_last_checkpoint(trainer) == folder / "step10.ckpt"
    assert "skipping unreadable checkpoint" in caplog.text and "last.ckpt" in caplog.text

    for name in ("step10.ckpt",):
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        resolve_last_checkpoint(trainer)
