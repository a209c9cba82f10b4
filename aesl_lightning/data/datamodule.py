"""LightningDataModules: `SFTDataModule` (prompt-completion training) and `PromptDataModule` (RL, evaluation).

Both read any source of `formats.py` (local file, Hugging Face name, or `"synthetic"`), encode everything
once at `setup` into plain lists (the datasets are small), and batch with the collate functions of
`encode.py`. Which examples each split holds is `splits.py`; the mid-epoch resumable loaders are `loaders.py`.
"""

from __future__ import annotations

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
from aesl_lightning.data.formats import SYNTHETIC, PromptExample, SFTExample, prompt_examples, sft_examples
from aesl_lightning.data.loaders import (
    EpochShuffleSampler,
    ResumableDataLoader,
    ResumableTraining,
    make_loader,
    training_progress,
)
from aesl_lightning.data.splits import load_splits, report_split, validate_local_sources
from aesl_lightning.data.synthetic import ArithmeticConfig

__all__ = ["SFTDataModule", "PromptDataModule", "EpochShuffleSampler", "ResumableDataLoader"]


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    # Imported here: loading weights-side code is only needed when a tokenizer is named by string.
    from aesl_lightning.infra.models import load_tokenizer

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



# ----------------------------------------------------------------------------------------------------
# SFT


class SFTDataModule(ResumableTraining, L.LightningDataModule):
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
        self.validate_sources(train=train, val=val, val_size=val_size)

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_data: list[EncodedSFT] = []
        self.val_data: list[EncodedSFT] = []
        self.val_examples: list[SFTExample] = []
        self.val_prompt_data: list[EncodedPrompt] = []
        self.num_dropped: dict[str, int] = {}

    @staticmethod
    def validate_sources(train: str | None = SYNTHETIC, val: str | None = None, val_size: int = 32, **_) -> None:
        """Check the local files of `train` and `val` as SFT data now, and that a local `train` has more than
        `val_size` examples when the validation set is held out of it (see `validate_local_sources`); the
        constructor calls it, and the CLI before it builds the model."""
        validate_local_sources({"train": train, "val": val}, sft_examples, held_out={"val": val_size})

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use this tokenizer object (takes precedence over `tokenizer` and the LightningModule's)."""
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_data:
            return  # encoded once; Lightning calls setup for every stage
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer, self.tokenizer_name)
        splits = load_splits(
            self.train, self.split, {"val": (self.val, self.val_split, self.val_size)}, self.synthetic, self.seed, sft_examples
        )
        encoded = {}
        for name, (examples, origin) in splits.items():
            encoded[name], self.num_dropped[name] = encode_sft_examples(
                self.tokenizer, examples, self.max_length, self.overlong, self.system_prompt
            )
            report_split("SFT", name, origin, len(encoded[name]), self.num_dropped[name], "max_length", self.max_length)
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
        return self._resumable(make_loader(self.train_data, self.batch_size, collate, self.num_workers, self.shuffle,
                                           self.seed, progress=training_progress(self)))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_data:
            return []
        return make_loader(self.val_data, self.eval_batch_size, partial(collate_sft, pad_token_id=self.pad_token_id), self.num_workers)

    def val_prompts_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Validation prompts for generation: batches of `collate_prompts` (left-padded ids, `answer` list, ...)."""
        collate = partial(collate_prompts, pad_token_id=self.pad_token_id)
        return make_loader(self.val_prompt_data, batch_size or self.eval_batch_size, collate, 0)


# ----------------------------------------------------------------------------------------------------
# RL and evaluation


class PromptDataModule(ResumableTraining, L.LightningDataModule):
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
        self.validate_sources(train=train, val=val, test=test, val_size=val_size, test_size=test_size)

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.data: dict[str, list[EncodedPrompt]] = {}
        self.examples: dict[str, list[PromptExample]] = {}
        self.num_dropped: dict[str, int] = {}

    @staticmethod
    def validate_sources(train: str | None = SYNTHETIC, val: str | None = None, test: str | None = None,
                         val_size: int = 32, test_size: int = 0, **_) -> None:
        """Check the local files of `train`, `val` and `test` as prompt data now, and that a local `train` has
        more examples than `val_size` + `test_size` held out of it (see `validate_local_sources`); the
        constructor calls it, and the CLI before it builds the model."""
        validate_local_sources({"train": train, "val": val, "test": test}, prompt_examples,
                               held_out={"val": val_size, "test": test_size})

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use this tokenizer object (takes precedence over `tokenizer` and the LightningModule's)."""
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return  # encoded once; Lightning calls setup for every stage
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer, self.tokenizer_name)
        others = {"val": (self.val, self.val_split, self.val_size), "test": (self.test, self.test_split, self.test_size)}
        splits = load_splits(self.train, self.split, others, self.synthetic, self.seed, prompt_examples)
        for name, (examples, origin) in splits.items():
            self.examples[name] = examples
            self.data[name], self.num_dropped[name] = encode_prompt_examples(
                self.tokenizer, examples, self.max_prompt_length, self.overlong, self.system_prompt
            )
            report_split("prompt", name, origin, len(self.data[name]), self.num_dropped[name], "max_prompt_length", self.max_prompt_length)

    @property
    def pad_token_id(self) -> int:
        return _pad_id(self.tokenizer)

    def _split_loader(self, name: str, batch_size: int, shuffle: bool = False, resumable: bool = False) -> DataLoader | list:
        if not self.data.get(name):
            return []
        collate = partial(collate_prompts, pad_token_id=self.pad_token_id)
        return make_loader(self.data[name], batch_size, collate, self.num_workers, shuffle, self.seed,
                           progress=training_progress(self) if resumable else None)

    def train_dataloader(self) -> DataLoader:
        if not self.data.get("train"):
            raise ValueError("PromptDataModule: no training prompts (train=None)")
        loader = self._split_loader("train", self.batch_size, self.shuffle, resumable=True)
        # Each new iterator draws a worker seed from the loader's generator, by default torch's global one, which
        # also samples GRPO's rollouts: a run resumed mid-epoch builds an iterator the uninterrupted run did not.
        loader.generator = torch.Generator().manual_seed(self.seed)
        return self._resumable(loader)

    def val_dataloader(self) -> DataLoader | list:
        return self._split_loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        return self._split_loader("test", self.eval_batch_size)
