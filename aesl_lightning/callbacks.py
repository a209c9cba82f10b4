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
    """

    def __init__(self, dirpath: str | None = None, source: Literal["last", "best"] = "last", merge_lora: bool | None = None):
        self.dirpath = dirpath
        self.source = source
        self.merge_lora = merge_lora
        self.exported: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not hasattr(pl_module, "export_hf"):
            return
        if self.source == "best":
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if best:
                import torch

                state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
                pl_module.load_state_dict(state)
            else:
                log.warning("HFExport(source='best'): no best checkpoint in this run; exporting the last weights")
        out = Path(self.dirpath) if self.dirpath else run_dir(trainer) / "hf_model"
        from aesl_lightning.fsdp import is_sharded

        if is_sharded(pl_module.model):
            # gathering the shards is collective: every rank calls, rank 0 writes
            self.exported = pl_module.export_hf(out, merge_lora=self.merge_lora)
        elif trainer.is_global_zero:
            self.exported = pl_module.export_hf(out, merge_lora=self.merge_lora)


class RunSummary(Callback):
    """Print, at the end of fit, where the TensorBoard logs, the checkpoints and the export are."""

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
        print("\n".join(lines), flush=True)
