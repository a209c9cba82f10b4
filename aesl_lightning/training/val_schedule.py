"""ValidationSchedule: validate at listed optimiser steps, step 0 (before any update) included.

A diversity curve is read on a log-x axis: its turning point is found early, where most of the change
happens, and a "peak" at the first validation seen is a boundary, not a turning point. Lightning validates
every n batches; this callback validates exactly at the listed global steps instead, e.g. 0, 1, 2, 4, ...

    steps = the listed `val_steps`, or with `log_spaced`: 0, every power of `base` below the run's length
            in optimiser steps (max_steps, or max_epochs x steps per epoch), and that length itself; the last
            step is added to a listed schedule too (the final weights are validated and checkpointed)

Step s is validated after the optimiser step that reaches global step s (step 0: before the first
update), and its metrics are logged at x = s (a logged "step", Lightning's way to set the x-axis). The steps already validated are in the checkpoint, so a resumed run validates at the remaining
listed steps only, none twice (a checkpoint written before its step's validation validates that step at the
start of the resumed run).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("aesl_lightning")


def log_spaced_steps(max_steps: int, base: float = 2.0) -> list[int]:
    """0, then round(base^j) for j = 0, 1, ... below `max_steps`, then `max_steps`: [0, 1, 2, 4, ..., max_steps]."""
    if max_steps < 0:
        raise ValueError(f"ValidationSchedule: max_steps must be >= 0, got {max_steps}")
    if not base > 1.0:
        raise ValueError(f"ValidationSchedule.base: expected a number > 1, got {base}")
    steps, j = {0, max_steps}, 0
    while round(base**j) < max_steps:
        steps.add(round(base**j))
        j += 1
    return sorted(steps)


class ValidationSchedule(Callback):
    """Validate at the listed optimiser steps (step 0 = before any update) instead of every n batches.

    Lightning's own trigger (`val_check_interval`, end of epoch) is switched off while this callback is in the
    trainer; validation runs exactly at the schedule's steps that the run reaches.

    Args:
        val_steps: Global steps to validate at, e.g. [0, 1, 2, 4, 8, 16, 32], and the run's last step; None =
            `log_spaced`.
        log_spaced: With `val_steps` None: 0, the powers of `base` below the run's length in optimiser steps, and
            that length (max_steps, or max_epochs x steps per epoch).
        base: Ratio between neighbouring log-spaced steps.
    """

    def __init__(self, val_steps: list[int] | None = None, log_spaced: bool = True, base: float = 2.0) -> None:
        if val_steps is not None:
            bad = [s for s in val_steps if not isinstance(s, int) or isinstance(s, bool) or s < 0]
            if bad:
                raise ValueError(f"ValidationSchedule.val_steps: expected integers >= 0, found {bad}")
        elif not log_spaced:
            raise ValueError("ValidationSchedule: give val_steps, or set log_spaced: true")
        if not base > 1.0 or not math.isfinite(base):
            raise ValueError(f"ValidationSchedule.base: expected a number > 1, got {base}")
        self.val_steps = None if val_steps is None else sorted(set(val_steps))
        self.base = base
        self.steps: list[int] = []
        self.done: set[int] = set()
        self._running = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(val_steps=self.val_steps, base=self.base)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            # Lightning's own trigger would validate at its interval too (and its restart logic would fast-forward
            # over a validation it thinks was running): this callback alone decides.
            trainer.fit_loop.epoch_loop._should_check_val_fx = lambda *args, **kwargs: False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches  # max_steps, or max_epochs x optimiser steps per epoch
        if self.val_steps is not None:
            # the run's last step too: the curve ends where training ends, and the checkpoints written at that
            # validation (last.ckpt) hold the final weights
            self.steps = sorted({*self.val_steps, int(total)} if math.isfinite(total) else set(self.val_steps))
        elif not math.isfinite(total):
            raise ValueError("ValidationSchedule(log_spaced=True) needs a finite run (trainer.max_steps or max_epochs "
                             "over a sized dataset); set one or list val_steps")
        else:
            self.steps = log_spaced_steps(int(total), self.base)
        beyond = [s for s in self.steps if s > total]
        if beyond:
            log.info("ValidationSchedule: steps %s lie beyond the run's %s steps and are never reached", beyond, total)

    # Step s is pending when the run is at global step s and has not validated it: at the start of an epoch
    # (step 0, or a resumed run), before a batch (a resumed run mid-epoch), after an optimiser step.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validate_if_due(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._validate_if_due(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self._validate_if_due(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._running:
            # Lightning would put the metrics at its count of stepped batches (one behind global_step after an
            # update, so steps 0 and 1 would share an x value); a logged "step" is the x-axis it uses instead.
            pl_module.log("step", float(trainer.global_step), batch_size=1, sync_dist=True)

    def _validate_if_due(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.done or not trainer.enable_validation:
            return
        self.done.add(step)  # before running: the checkpoint saved at this validation's end must hold it
        loop = trainer.fit_loop.epoch_loop
        trainer.validating = True
        first_loop_iter = trainer._logger_connector._first_loop_iter
        self._running = True
        try:
            loop.val_loop.run()
        finally:
            self._running = False
        # ModelCheckpoint names files by a "step" in callback_metrics before the global step: drop ours so a
        # checkpoint written later in training is not named after this validation's step
        trainer._logger_connector._callback_metrics.pop("step", None)
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

    def state_dict(self) -> dict[str, Any]:
        return {"done": sorted(self.done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = set(int(s) for s in state_dict.get("done", []))
