"""Shared by the benchmark scripts: wall time of each training step, under Lightning and under a transformers Trainer."""

import time

import lightning as L
from transformers import TrainerCallback


class StepTimer(L.Callback):
    """Seconds from `on_train_batch_start` to `on_train_batch_end` (forward, backward, optimiser), per step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


class HFStepTimer(TrainerCallback):
    """Seconds from `on_step_begin` to `on_step_end` of a transformers / TRL Trainer, per optimiser step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
