"""DataLoaders that resume mid-epoch: a per-epoch seeded sampler, a loader whose position goes into
Lightning checkpoints, and the datamodule mixin that saves and restores that position."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

__all__ = ["EpochShuffleSampler", "ResumableDataLoader", "ResumableTraining", "make_loader", "training_progress"]

log = logging.getLogger("aesl_lightning")


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch that depends only on `(seed, epoch)` (`shuffle=False`: 0..n-1).

    Lightning calls `set_epoch` at the start of every epoch, so a run resumed from a checkpoint sees the same
    order in its later epochs as an uninterrupted run (a global-RNG shuffle would not). `resume_at(epoch, k)`
    makes the next pass over `epoch` start at its k-th index: the rest of an epoch interrupted mid-way.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_items, self.seed, self.epoch, self.shuffle = num_items, seed, 0, shuffle
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        self._resume = (epoch, start)

    def order(self, epoch: int) -> list[int]:
        """The full order of `epoch`."""
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self):
        order = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
            self._resume = None  # once: the next pass over this epoch (a new run) starts at 0
        return iter(order)

    def __len__(self) -> int:
        return self.num_items


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning checkpoints, so that a run resumed from a
    mid-epoch checkpoint continues with the batches the interrupted run had not trained on yet.

    Lightning saves `state_dict()` of a training loader that has one and passes it back to `load_state_dict`
    when resuming. The position is the trainer's: `(epoch, batches processed in it)` read from `progress()` at
    save time (counting batches fetched here would be off by the ones Lightning prefetches). Loading makes the
    sampler skip `batches x batch_size` indices of that epoch. Exact for a single process; under DDP Lightning
    wraps the sampler per rank, and the skip counts global indices (`x world_size`).
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int, int]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        epoch, batches, world = self.progress() if self.progress is not None else (0, 0, 1)
        return {"epoch": int(epoch), "batches": int(batches), "world_size": int(world),
                "batch_size": self.batch_size, "num_items": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler):
            return
        if (state.get("batch_size"), state.get("num_items")) != (self.batch_size, len(self.dataset)):
            log.warning(
                "training data changed since the checkpoint (batch size %s -> %s, %s -> %s examples): the "
                "interrupted epoch restarts from its beginning", state.get("batch_size"), self.batch_size,
                state.get("num_items"), len(self.dataset),
            )
            return
        start = state["batches"] * state["batch_size"] * state.get("world_size", 1)
        if 0 < start < len(self.dataset):
            sampler.resume_at(state["epoch"], start)


def make_loader(data: list, batch_size: int, collate: Callable, num_workers: int, shuffle: bool = False, seed: int = 0,
                progress: Callable[[], tuple[int, int, int]] | None = None) -> DataLoader:
    """Evaluation loaders are plain; a training loader (`progress` given) is resumable mid-epoch."""
    if progress is None:
        return DataLoader(data, batch_size=batch_size, sampler=EpochShuffleSampler(len(data), seed) if shuffle else None,
                          collate_fn=collate, num_workers=num_workers, persistent_workers=num_workers > 0)
    return ResumableDataLoader(
        data, batch_size=batch_size, sampler=EpochShuffleSampler(len(data), seed, shuffle), collate_fn=collate,
        num_workers=num_workers, persistent_workers=num_workers > 0, progress=progress,
    )


class ResumableTraining:
    """Mixin for the datamodules: the training loader's position goes into checkpoints through the datamodule's
    own `state_dict` too. Lightning restores a datamodule before it first builds the training loader, whereas
    its loader-state path is skipped when `configure_optimizers` asks for `estimated_stepping_batches` (as
    ours do), which builds the loader before the loop state is restored."""

    _train_loader: ResumableDataLoader | None = None
    _pending_loader_state: dict | None = None

    def _resumable(self, loader: DataLoader) -> DataLoader:
        if isinstance(loader, ResumableDataLoader):
            self._train_loader = loader
            if self._pending_loader_state is not None:
                loader.load_state_dict(self._pending_loader_state)
                self._pending_loader_state = None
        return loader

    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_loader_state = state


def training_progress(datamodule: L.LightningDataModule) -> Callable[[], tuple[int, int, int]]:
    """(epoch, batches processed in it, world size) of the datamodule's trainer, read when a checkpoint is saved."""

    def progress() -> tuple[int, int, int]:
        trainer = datamodule.trainer
        if trainer is None:
            return 0, 0, 1
        return (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                trainer.world_size)

    return progress
