"""The files of DiversityEarlyStopping's peak: `peak.ckpt`, its Hugging Face export and `turning_point.json`.

Every write is atomic (a temporary file, then `os.replace`). A checkpoint is read only with
`torch.load(weights_only=True)` (`aesl_lightning.modules.lm.load_checkpoint`), and after resuming a recorded peak is
followed only inside the resumed run's own folder. Which validation is the peak is the rule's business
(`aesl_lightning.maths.turning_point`); when to save, export and write is the callback's (`aesl_lightning.training.early_stopping`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger("aesl_lightning")

__all__ = ["HF_MODEL_DIR", "PEAK_CHECKPOINT", "TURNING_POINT_FILE", "copy_peak", "export_weights", "find_peak",
           "holds_step", "save_peak", "write_json"]

TURNING_POINT_FILE = "turning_point.json"
PEAK_CHECKPOINT = "peak.ckpt"
HF_MODEL_DIR = "hf_model"


def save_peak(trainer: L.Trainer, out_dir: Path, *, weights_only: bool) -> Path:
    """Save the trainer's state as `<out_dir>/peak.ckpt`, replacing the previous peak atomically; returns its path.

    Collective: every rank calls it, rank 0 writes (a sharded strategy writes a folder, which replaces the old one).
    """
    final = out_dir / PEAK_CHECKPOINT
    tmp = out_dir / f".{PEAK_CHECKPOINT}.tmp"
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
    trainer.strategy.barrier("DiversityEarlyStopping.save_peak")
    trainer.save_checkpoint(tmp, weights_only=weights_only)  # collective; rank 0 writes
    if trainer.is_global_zero:
        if final.is_dir():  # a sharded (distributed) checkpoint is a folder, which os.replace cannot overwrite
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.strategy.barrier("DiversityEarlyStopping.save_peak")
    return final.resolve()


def export_weights(pl_module: L.LightningModule, state_dict: dict[str, Any], out: Path) -> Path | None:
    """`pl_module.export_hf(out)` with the weights `state_dict`; the module's own weights are put back afterwards
    (it may keep training, or be exported again by another callback)."""
    current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
    try:
        pl_module.load_state_dict(state_dict)
        return pl_module.export_hf(out)
    finally:
        pl_module.load_state_dict(current)


def holds_step(path: Path, want: int) -> bool:
    """Whether `path` is a checkpoint of global step `want` (False, with a warning, for one the safe loader refuses)."""
    if not path.is_file():
        return False
    from aesl_lightning.modules.checkpoint_load import UnsafeCheckpointError, load_checkpoint

    try:
        return load_checkpoint(path).get("global_step") == want
    except UnsafeCheckpointError as err:
        log.warning("DiversityEarlyStopping: %s", err)
        return False


def find_peak(want: int, *, own: Path, recorded: list[str], resumed_from: str | None) -> Path | None:
    """After resuming, the checkpoint of the peak at global step `want`, or None (with a warning).

    `own` (this run's `peak.ckpt`) if it holds that step, else the first of the `recorded` paths (relative ones
    from the resumed checkpoint's folder or the one above it) that lies inside one of those two folders and holds
    that step. A checkpoint is never followed outside its own run folder.
    """
    if holds_step(own, want):
        return own
    if not recorded or resumed_from is None:
        log.warning("DiversityEarlyStopping: the resumed run's peak (step %s) has no checkpoint here; it is "
                    "exported only if a new peak is found", want)
        return None
    ckpt = Path(resumed_from).resolve()
    roots = [ckpt.parent, ckpt.parent.parent]
    from aesl_lightning.training.callbacks import is_inside
    from aesl_lightning.infra.export import clean_stale_exports

    for path in recorded:
        relative = not Path(path).is_absolute()
        for root in roots:
            candidate = root / path if relative else Path(path)
            if is_inside(candidate, root) and candidate.is_file() and holds_step(candidate, want):
                clean_stale_exports(candidate.parent / HF_MODEL_DIR)  # a killed export of that run's peak
                return candidate
    log.warning(
        "DiversityEarlyStopping: the resumed checkpoint records the peak (step %s) at %s; not used: no file "
        "holding that step inside %s or %s (a checkpoint is never followed outside its own run folder). The "
        "peak is exported only if a new peak is found", want, " and ".join(map(repr, recorded)), roots[0], roots[1]
    )
    return None


def copy_peak(source: Path, own: Path) -> None:
    """Copy the checkpoint `source` to `own` atomically."""
    own.parent.mkdir(parents=True, exist_ok=True)
    tmp = own.parent / f".{own.name}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, own)


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write `content` as indented JSON to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)
