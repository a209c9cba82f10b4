"""The training progress bar over the run's real step budget ("step 12/32") instead of Lightning's per-epoch
bar, which reads "Epoch 1/-2" when a run is bounded by max_steps (max_epochs is then -1)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def _budget(trainer: L.Trainer) -> int | None:
    total = trainer.estimated_stepping_batches
    return int(total) if total != float("inf") else None


def _description(trainer: L.Trainer) -> str:
    total = _budget(trainer)
    return f"step {trainer.global_step}/{total if total is not None else '?'} (epoch {trainer.current_epoch})"


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose training bar counts optimiser steps up to the run's budget (max_steps, or
    max_epochs x steps per epoch), with "step s/N (epoch e)" as its description."""

    @property
    def total_train_batches(self) -> int | float:
        total = _budget(self.trainer)
        return total if total is not None else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return _description(self.trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                                 description=_description(trainer))
            self.refresh()


class StepTQDMProgressBar(TQDMProgressBar):
    """The tqdm fallback (without `rich`): the same step count and description."""

    @property
    def total_train_batches(self) -> int | float:
        total = _budget(self.trainer)
        return total if total is not None else super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description(_description(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description(_description(trainer), refresh=False)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def use_step_progress_bar(trainer: L.Trainer) -> None:
    """Replace Lightning's default progress bar (not one the user configured: a subclass is left alone)."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[i] = StepProgressBar()
        elif type(callback) is TQDMProgressBar:
            trainer.callbacks[i] = StepTQDMProgressBar()
