"""LightningDataModules: `SFTDataModule` (prompt-completion training) and `PromptDataModule` (RL, evaluation).

Both read any source of `formats.py` (local file, Hugging Face name, or `"synthetic"`), encode everything
once at `setup` into plain lists (the datasets are small), and batch with the collate functions of
`encode.py`. Validation/test sets come from their own source or are held out of the training source,
deterministically by `seed`; a synthetic training source gets freshly generated, disjoint splits instead.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from aesl_lightning.data.encode import (
    EncodedPrompt,
    EncodedSFT,
    Overlong,
    collate_prompts,
    collate_sft,
    encode_prompt_examples,
    encode_sft_examples,
)
from aesl_lightning.data.formats import (
    LOCAL_FORMATS,
    SYNTHETIC,
    DataFormatError,
    PromptExample,
    SFTExample,
    load_records,
    prompt_examples,
    sft_examples,
    synthetic_records,
)
from aesl_lightning.data.synthetic import ArithmeticConfig

log = logging.getLogger("aesl_lightning")


# ----------------------------------------------------------------------------------------------------
# Shared plumbing


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    # Imported here: loading weights-side code is only needed when a tokenizer is named by string.
    from aesl_lightning.models import load_tokenizer

    path = Path(name)
    if path.suffix == ".gguf":
        return load_tokenizer(str(path.parent), gguf_file=path.name)
    return load_tokenizer(name)


def _resolve_tokenizer(datamodule: L.LightningDataModule, attached: PreTrainedTokenizerBase | None, name: str | None):
    """The attached tokenizer, else the one named by `name`, else the trained LightningModule's `.tokenizer`."""
    if attached is not None:
        return attached
    if name is not None:
        return _load_tokenizer(name)
    trainer = datamodule.trainer
    tokenizer = getattr(trainer.lightning_module, "tokenizer", None) if trainer is not None else None
    if tokenizer is None:
        raise ValueError(
            f"{type(datamodule).__name__}: no tokenizer; pass tokenizer='<name or path>', call attach_tokenizer(tokenizer), "
            "or use it with a Trainer whose LightningModule has a .tokenizer"
        )
    return tokenizer


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Padded positions are masked out of attention and loss, so EOS serves when a tokenizer has no pad token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


def _load_splits(
    train: str | None,
    train_split: str,
    others: dict[str, tuple[str | None, str, int]],
    synthetic: ArithmeticConfig,
    seed: int,
    normalise: Callable[[list[tuple[str, dict]], str], list],
) -> dict[str, tuple[list, str]]:
    """Examples and an origin label per split: `{"train": (...), name: (...) for name in others}`.

    `others[name] = (source, hf_split, size)`: a split with its own source loads it (`"synthetic"`: a generated
    split disjoint from the synthetic training set); one without is `size` examples held out of `train`
    (a synthetic `train` generates them disjointly instead); size 0 and no source means no such split.
    """
    wants_synthetic = {
        name: size for name, (source, _, size) in others.items() if source == SYNTHETIC or (source is None and train == SYNTHETIC)
    }
    generated = {}
    if train == SYNTHETIC or wants_synthetic:
        sizes = {"train": synthetic.num_examples if train == SYNTHETIC else 0, **wants_synthetic}
        generated = synthetic_records(synthetic, sizes)

    splits: dict[str, tuple[list, str]] = {}
    if train is not None:
        records = generated["train"] if train == SYNTHETIC else load_records(train, train_split, synthetic)
        splits["train"] = (normalise(records, train), train)

    held_out = {
        name: size for name, (source, _, size) in others.items() if source is None and train not in (None, SYNTHETIC) and size > 0
    }
    if held_out:
        examples, _ = splits["train"]
        if sum(held_out.values()) >= len(examples):
            raise DataFormatError(f"{train}: has {len(examples)} examples, too few to hold out {held_out} and keep some for training")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        start = 0
        for name, size in held_out.items():
            chosen = sorted(order[start : start + size])
            splits[name] = ([examples[i] for i in chosen], f"{train} (held out)")
            start += size
        kept = sorted(order[start:])
        splits["train"] = ([examples[i] for i in kept], train)

    for name, (source, hf_split, size) in others.items():
        if name in wants_synthetic:
            if size > 0 or source == SYNTHETIC:
                splits[name] = (normalise(generated[name], f"synthetic {name} split"), f"synthetic {name} split")
        elif source is not None:
            splits[name] = (normalise(load_records(source, hf_split, synthetic), source), source)
    return splits


def validate_local_sources(sources: dict[str, str | None], normalise: Callable, owner: str = "data") -> None:
    """Read and normalise every local-file source now, so that a malformed file (bad JSON, a missing field, no
    records) is reported at once, before any model is built. `sources` maps option names to sources; the error
    is `DataFormatError("<owner>.<option>: <file:line>: ...")`. Hugging Face names and "synthetic" are checked
    at `setup` (they need the network or a generator)."""
    for option, source in sources.items():
        if source is None or source == SYNTHETIC:
            continue
        path = Path(source)
        if path.suffix.lower() not in LOCAL_FORMATS and not path.exists():
            continue  # a Hugging Face dataset name
        try:
            normalise(load_records(source), source)
        except DataFormatError as error:
            raise DataFormatError(f"{owner}.{option}: {error}") from None


def _report(kind: str, name: str, origin: str, kept: int, dropped: int, limit_name: str, limit: int) -> None:
    if dropped:
        log.warning(
            "%s %s: dropped %d of %d examples from %s longer than %s=%d tokens",
            *(kind, name, dropped, kept + dropped, origin, limit_name, limit),
        )
    if not kept:
        raise DataFormatError(f"{origin}: no {name} examples left after dropping {dropped} longer than {limit_name}={limit} tokens")
    log.info("%s %s: %d examples from %s", kind, name, kept, origin)


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


def _loader(data: list, batch_size: int, collate: Callable, num_workers: int, shuffle: bool = False, seed: int = 0,
            progress: Callable[[], tuple[int, int, int]] | None = None) -> DataLoader:
    """Evaluation loaders are plain; a training loader (`progress` given) is resumable mid-epoch."""
    if progress is None:
        return DataLoader(data, batch_size=batch_size, sampler=EpochShuffleSampler(len(data), seed) if shuffle else None,
                          collate_fn=collate, num_workers=num_workers, persistent_workers=num_workers > 0)
    return ResumableDataLoader(
        data, batch_size=batch_size, sampler=EpochShuffleSampler(len(data), seed, shuffle), collate_fn=collate,
        num_workers=num_workers, persistent_workers=num_workers > 0, progress=progress,
    )


class _ResumableTraining:
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


def _training_progress(datamodule: L.LightningDataModule) -> Callable[[], tuple[int, int, int]]:
    """(epoch, batches processed in it, world size) of the datamodule's trainer, read when a checkpoint is saved."""

    def progress() -> tuple[int, int, int]:
        trainer = datamodule.trainer
        if trainer is None:
            return 0, 0, 1
        return (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                trainer.world_size)

    return progress


# ----------------------------------------------------------------------------------------------------
# SFT


class SFTDataModule(_ResumableTraining, L.LightningDataModule):
    """Prompt-completion data for supervised fine-tuning: right-padded batches with prompt tokens masked.

    Batches are `{"input_ids", "labels", "attention_mask"}` tensors `(B, T)`; `labels` is -100 on prompt and
    padding. `val_prompts_dataloader()` gives the validation prompts (left-padded, with their answers) for
    generation-based evaluation.

    Args:
        train: Training data: a .jsonl/.json/.parquet file, a Hugging Face dataset name ("name" or
            "name:config"), or "synthetic" (the built-in arithmetic task).
        val: Validation data (same kinds as `train`); None holds out `val_size` examples of `train`.
        val_size: Number of validation examples held out of `train` when `val` is None (0: no validation);
            for a synthetic `train`, the size of a freshly generated disjoint validation set.
        synthetic: Knobs of the synthetic arithmetic task (num_examples is the training set size).
        tokenizer: Tokenizer name or path (a .gguf file path works too); None uses the `.tokenizer` of the
            LightningModule being trained.
        max_length: Longest example (prompt + completion) in tokens.
        overlong: What to do with longer examples: "drop" (skip and count them) or "error".
        system_prompt: System message put before every prompt that has none.
        batch_size: Training batch size.
        eval_batch_size: Validation batch size (None: `batch_size`).
        num_workers: DataLoader worker processes.
        shuffle: Whether to shuffle the training set each epoch.
        seed: Seed of the shuffling and of the held-out validation split.
        split: Split of a Hugging Face `train` dataset.
        val_split: Split of a Hugging Face `val` dataset.
    """

    def __init__(
        self,
        train: str = SYNTHETIC,
        val: str | None = None,
        val_size: int = 32,
        synthetic: ArithmeticConfig = ArithmeticConfig(),
        tokenizer: str | None = None,
        max_length: int = 512,
        overlong: Overlong = "drop",
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        split: str = "train",
        val_split: str = "validation",
    ) -> None:
        super().__init__()
        self.train = train
        self.val = val
        self.val_size = val_size
        self.synthetic = synthetic
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.overlong = overlong
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.split = split
        self.val_split = val_split
        self.validate_sources(train=train, val=val)

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_data: list[EncodedSFT] = []
        self.val_data: list[EncodedSFT] = []
        self.val_examples: list[SFTExample] = []
        self.val_prompt_data: list[EncodedPrompt] = []
        self.num_dropped: dict[str, int] = {}

    @staticmethod
    def validate_sources(train: str | None = SYNTHETIC, val: str | None = None, **_) -> None:
        """Check the local files of `train` and `val` as SFT data now (see `validate_local_sources`); the
        constructor calls it, and the CLI before it builds the model."""
        validate_local_sources({"train": train, "val": val}, sft_examples)

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use this tokenizer object (takes precedence over `tokenizer` and the LightningModule's)."""
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_data:
            return  # encoded once; Lightning calls setup for every stage
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer, self.tokenizer_name)
        splits = _load_splits(
            self.train, self.split, {"val": (self.val, self.val_split, self.val_size)}, self.synthetic, self.seed, sft_examples
        )
        encoded = {}
        for name, (examples, origin) in splits.items():
            encoded[name], self.num_dropped[name] = encode_sft_examples(
                self.tokenizer, examples, self.max_length, self.overlong, self.system_prompt
            )
            _report("SFT", name, origin, len(encoded[name]), self.num_dropped[name], "max_length", self.max_length)
        self.train_data = encoded["train"]
        self.val_data = encoded.get("val", [])
        kept = {item.source for item in self.val_data}
        self.val_examples = [example for example in splits.get("val", ([], ""))[0] if example.source in kept]
        # The prompt alone is shorter than prompt + completion, which fit in max_length: nothing is dropped here.
        self.val_prompt_data, _ = encode_prompt_examples(self.tokenizer, self.val_examples, self.max_length, "drop", self.system_prompt)

    @property
    def pad_token_id(self) -> int:
        return _pad_id(self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        collate = partial(collate_sft, pad_token_id=self.pad_token_id)
        return self._resumable(_loader(self.train_data, self.batch_size, collate, self.num_workers, self.shuffle,
                                       self.seed, progress=_training_progress(self)))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_data:
            return []
        return _loader(self.val_data, self.eval_batch_size, partial(collate_sft, pad_token_id=self.pad_token_id), self.num_workers)

    def val_prompts_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Validation prompts for generation: batches of `collate_prompts` (left-padded ids, `answer` list, ...)."""
        collate = partial(collate_prompts, pad_token_id=self.pad_token_id)
        return _loader(self.val_prompt_data, batch_size or self.eval_batch_size, collate, 0)


# ----------------------------------------------------------------------------------------------------
# RL and evaluation


class PromptDataModule(_ResumableTraining, L.LightningDataModule):
    """Prompts with verifiable answers for RL (GRPO) and evaluation: left-padded prompt batches.

    Batches are `collate_prompts` dicts: `input_ids` and `attention_mask` `(B, T)` padded on the left (the
    chat-templated prompt ends with the generation prompt), and lists `prompt`, `answer`, `source` plus
    every other column of the records (TRL passes those to reward functions as keyword arguments).

    Args:
        train: Training prompts: a .jsonl/.json/.parquet file, a Hugging Face dataset name ("name" or
            "name:config"), "synthetic" (the built-in arithmetic task), or None (evaluation only).
        val: Validation prompts (same kinds as `train`); None holds out `val_size` prompts of `train`.
        test: Test prompts (same kinds as `train`); None holds out `test_size` prompts of `train`.
        val_size: Prompts held out of `train` for validation when `val` is None (0: none); for a
            synthetic `train`, the size of a generated disjoint validation set.
        test_size: Prompts held out of `train` for testing when `test` is None (0: none); for a synthetic
            `train` or `test`, the size of a generated disjoint test set.
        synthetic: Knobs of the synthetic arithmetic task (num_examples is the training set size).
        tokenizer: Tokenizer name or path (a .gguf file path works too); None uses the `.tokenizer` of the
            LightningModule being trained.
        max_prompt_length: Longest prompt in tokens (after the chat template).
        overlong: What to do with longer prompts: "drop" (skip and count them) or "error".
        system_prompt: System message put before every prompt that has none.
        batch_size: Prompts per training batch.
        eval_batch_size: Prompts per validation/test batch (None: `batch_size`).
        num_workers: DataLoader worker processes.
        shuffle: Whether to shuffle the training prompts each epoch.
        seed: Seed of the shuffling and of the held-out splits.
        split: Split of a Hugging Face `train` dataset.
        val_split: Split of a Hugging Face `val` dataset.
        test_split: Split of a Hugging Face `test` dataset.
    """

    def __init__(
        self,
        train: str | None = SYNTHETIC,
        val: str | None = None,
        test: str | None = None,
        val_size: int = 32,
        test_size: int = 0,
        synthetic: ArithmeticConfig = ArithmeticConfig(),
        tokenizer: str | None = None,
        max_prompt_length: int = 256,
        overlong: Overlong = "drop",
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
    ) -> None:
        super().__init__()
        self.train = train
        self.val = val
        self.test = test
        self.val_size = val_size
        self.test_size = test_size
        self.synthetic = synthetic
        self.tokenizer_name = tokenizer
        self.max_prompt_length = max_prompt_length
        self.overlong = overlong
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.split = split
        self.val_split = val_split
        self.test_split = test_split
        self.validate_sources(train=train, val=val, test=test)

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.data: dict[str, list[EncodedPrompt]] = {}
        self.examples: dict[str, list[PromptExample]] = {}
        self.num_dropped: dict[str, int] = {}

    @staticmethod
    def validate_sources(train: str | None = SYNTHETIC, val: str | None = None, test: str | None = None, **_) -> None:
        """Check the local files of `train`, `val` and `test` as prompt data now (see `validate_local_sources`);
        the constructor calls it, and the CLI before it builds the model."""
        validate_local_sources({"train": train, "val": val, "test": test}, prompt_examples)

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use this tokenizer object (takes precedence over `tokenizer` and the LightningModule's)."""
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return  # encoded once; Lightning calls setup for every stage
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer, self.tokenizer_name)
        others = {"val": (self.val, self.val_split, self.val_size), "test": (self.test, self.test_split, self.test_size)}
        splits = _load_splits(self.train, self.split, others, self.synthetic, self.seed, prompt_examples)
        for name, (examples, origin) in splits.items():
            self.examples[name] = examples
            self.data[name], self.num_dropped[name] = encode_prompt_examples(
                self.tokenizer, examples, self.max_prompt_length, self.overlong, self.system_prompt
            )
            _report("prompt", name, origin, len(self.data[name]), self.num_dropped[name], "max_prompt_length", self.max_prompt_length)

    @property
    def pad_token_id(self) -> int:
        return _pad_id(self.tokenizer)

    def _split_loader(self, name: str, batch_size: int, shuffle: bool = False, resumable: bool = False) -> DataLoader | list:
        if not self.data.get(name):
            return []
        collate = partial(collate_prompts, pad_token_id=self.pad_token_id)
        return _loader(self.data[name], batch_size, collate, self.num_workers, shuffle, self.seed,
                       progress=_training_progress(self) if resumable else None)

    def train_dataloader(self) -> DataLoader:
        if not self.data.get("train"):
            raise ValueError("PromptDataModule: no training prompts (train=None)")
        return self._resumable(self._split_loader("train", self.batch_size, self.shuffle, resumable=True))

    def val_dataloader(self) -> DataLoader | list:
        return self._split_loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        return self._split_loader("test", self.eval_batch_size)
