"""Shared by the benchmark scripts: wall time of each training step, under Lightning and under a transformers Trainer,
and the competing load that the "beside a busy process" runs start."""

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

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


LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
"""A torch (OpenMP) process keeping one core busy: the "beside a busy process" condition."""


@contextmanager
def competing_load(enabled: bool, settle_seconds: float = 5.0) -> Iterator[bool]:
    """Run the block beside `LOAD` in its own process when `enabled` (started, given time to settle, always killed)."""
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if enabled else None
    try:
        if load is not None:
            time.sleep(settle_seconds)
        yield load is not None
    finally:
        if load is not None:
            load.kill()
            load.wait()
