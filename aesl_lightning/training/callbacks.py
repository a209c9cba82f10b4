"""Callbacks that can be switched off: Hugging Face export at the end of fit, and a summary of where things are."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("aesl_lightning")


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's version folder (lightning_logs/version_N) or the root dir."""
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        return Path(trainer.logger.log_dir)
    return Path(trainer.default_root_dir)


class HFExport(Callback):
    """At the end of `fit`, export the model in Hugging Face format (the next stage's input).

    Args:
        dirpath: Output folder; None = `<run dir>/hf_model`.
        source: `last` exports the weights at the end of training; `best` first loads the best checkpoint
            of the run's ModelCheckpoint (falls back to the last weights, with a warning, if there is none).
        merge_lora: Merge LoRA adapters into the exported weights; None = as the LoRA config says.
        overwrite: Replace `dirpath` even if it holds files that are not a previous export. By default only a
            missing or empty folder or a previous export (its `aesl_export.json` marker) is replaced, and an
            export into any other folder stops with an error before anything is written.

    The best checkpoint is read with `torch.load(weights_only=True)` and only from inside the
    ModelCheckpoint's own folder or the resumed run's: a path restored from a checkpoint that points
    elsewhere is refused.
    """

    def __init__(
        self, dirpath: str | None = None, source: Literal["last", "best"] = "last", merge_lora: bool | None = None,
        overwrite: bool = False,
    ):
        if source not in ("last", "best"):
            raise ValueError(f"HFExport.source: expected 'last' or 'best', got {source!r}")
        self.dirpath = dirpath
        self.source = source
        self.merge_lora = merge_lora
        self.overwrite = overwrite
        self.exported: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "hf_model"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse an export folder that may not be replaced now, not after the whole run."""
        from aesl_lightning.infra.export import check_export_target

        if trainer.is_global_zero:
            check_export_target(self._target(trainer), True if self.overwrite else None)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not hasattr(pl_module, "export_hf"):
            return
        if self.source == "best":
            best = _best_checkpoint(trainer)
            if best is not None:
                from aesl_lightning.modules.checkpoint_load import load_checkpoint

                pl_module.load_state_dict(load_checkpoint(best)["state_dict"])
            else:
                log.warning("HFExport(source='best'): no best checkpoint in this run; exporting the last weights")
        out = self._target(trainer)
        from aesl_lightning.infra.fsdp import is_sharded

        overwrite = True if self.overwrite else None
        if is_sharded(pl_module.model):
            # gathering the shards is collective: every rank calls, rank 0 writes
            self.exported = pl_module.export_hf(out, merge_lora=self.merge_lora, overwrite=overwrite)
        elif trainer.is_global_zero:
            self.exported = pl_module.export_hf(out, merge_lora=self.merge_lora, overwrite=overwrite)


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path`, with symbolic links and `..` resolved, lies inside `folder` (also resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except (ValueError, OSError):
        return False
    return True


def _best_checkpoint(trainer: L.Trainer) -> Path | None:
    """The ModelCheckpoint's best checkpoint, if it is a file inside that callback's own folder or beside the
    checkpoint this run resumed from (its folder or the one above: the run folder of `checkpoints/last.ckpt`).

    `best_model_path` comes back from a resumed checkpoint; one naming a file anywhere else is refused.
    """
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    if not best:
        return None
    roots = [callback.dirpath] if callback.dirpath is not None else []
    resumed = getattr(trainer, "ckpt_path", None)
    if resumed:
        resumed = Path(resumed).resolve()
        roots += [resumed.parent, resumed.parent.parent]
    if not any(is_inside(best, root) for root in roots):
        raise ValueError(
            f"HFExport(source='best'): the best checkpoint {best!r} is outside the ModelCheckpoint folder "
            f"{callback.dirpath!r} and the resumed run's folder; refusing to load it (a resumed checkpoint may "
            "name any file)"
        )
    return Path(best)


class RunSummary(Callback):
    """Print, at the end of fit, where the TensorBoard logs, the checkpoints and the export are; draw the
    diversity figure (`aesl_lightning.training.plots`) into the run folder as `diversity.png` and print the turning-point
    verdict: "Turning point at step X (diversity ..., answer accuracy there ...)" or why there is none yet."""

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = [f"Run finished at step {trainer.global_step}{' (interrupted)' if trainer.interrupted else ''}."]
        if trainer.logger is not None and trainer.logger.log_dir is not None:
            lines.append(f"  TensorBoard logs : {trainer.logger.log_dir}")
            lines.append(f"  view them with   : tensorboard --logdir {Path(trainer.logger.log_dir).parent}")
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.best_model_path:
                    lines.append(f"  best checkpoint  : {cb.best_model_path}")
                if cb.last_model_path:
                    lines.append(f"  last checkpoint  : {cb.last_model_path}")
            if isinstance(cb, HFExport) and cb.exported is not None:
                lines.append(f"  Hugging Face model: {cb.exported}")
            if type(cb).__name__ == "DiversityEarlyStopping" and getattr(cb, "exported", None) is not None:
                lines.append(f"  diversity peak    : {cb.exported} (see turning_point.json beside it)")
        lines += _figure_and_verdict(trainer)
        print("\n".join(lines), flush=True)


def _figure_and_verdict(trainer: L.Trainer) -> list[str]:
    """Draw the diversity figure into the run folder (from the TensorBoard events) and say where the turning
    point is; a figure that cannot be drawn is a warning, not a failed run."""
    from aesl_lightning.training.plots import draw_at_end_of_fit, verdict

    stopper = next((cb for cb in trainer.callbacks if type(cb).__name__ == "DiversityEarlyStopping"), None)
    rule = stopper.rule if stopper is not None else None
    for logger in trainer.loggers:
        flush = getattr(getattr(logger, "experiment", None), "flush", None)
        if callable(flush):
            flush()  # the figure reads the event files
    try:
        figure, line = draw_at_end_of_fit(run_dir(trainer), rule)
    except Exception as error:  # noqa: BLE001 - matplotlib / tensorboard failures must not lose the run's summary
        log.warning("RunSummary: the diversity figure could not be drawn: %s", error)
        figure, line = None, verdict(rule)
    return ([f"  diversity figure : {figure}"] if figure is not None else []) + [f"  {line[0].upper()}{line[1:]}"]
