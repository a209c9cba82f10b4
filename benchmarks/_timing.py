"""Shared by the benchmark scripts: wall time of each Lightning training step."""

import time

import lightning as L


class StepTimer(L.Callback):
    """Seconds from `on_train_batch_start` to `on_train_batch_end` (forward, backward, optimiser), per step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)
