"""Data: the synthetic arithmetic task, TRL-format readers, token encoding and the LightningDataModules.

Names are imported on first use (PEP 562), so `python -m aesl_lightning synthetic` and
`python -m aesl_lightning.data.synthetic` start without importing torch, Lightning or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aesl_lightning.data.datamodule import PromptDataModule, SFTDataModule
    from aesl_lightning.data.encode import (
        IGNORE_INDEX,
        EncodedPrompt,
        EncodedSFT,
        chat_messages,
        collate_prompts,
        collate_sft,
        encode_prompt,
        encode_prompt_examples,
        encode_sft,
        encode_sft_examples,
        has_chat_template,
    )
    from aesl_lightning.data.formats import (
        DataFormatError,
        PromptExample,
        SFTExample,
        load_prompt_examples,
        load_records,
        load_sft_examples,
        normalize_answer,
        prompt_examples,
        sft_examples,
        synthetic_records,
        to_prompt_example,
        to_sft_example,
    )
    from aesl_lightning.data.jsonl import read_jsonl, write_jsonl
    from aesl_lightning.data.synthetic import ArithmeticConfig, disjoint_splits, generate_arithmetic

_MODULES = {
    "datamodule": ("PromptDataModule", "SFTDataModule"),
    "encode": (
        "IGNORE_INDEX",
        "EncodedPrompt",
        "EncodedSFT",
        "chat_messages",
        "collate_prompts",
        "collate_sft",
        "encode_prompt",
        "encode_prompt_examples",
        "encode_sft",
        "encode_sft_examples",
        "has_chat_template",
    ),
    "formats": (
        "DataFormatError",
        "PromptExample",
        "SFTExample",
        "load_prompt_examples",
        "load_records",
        "load_sft_examples",
        "normalize_answer",
        "prompt_examples",
        "sft_examples",
        "synthetic_records",
        "to_prompt_example",
        "to_sft_example",
    ),
    "jsonl": ("read_jsonl", "write_jsonl"),
    "synthetic": ("ArithmeticConfig", "disjoint_splits", "generate_arithmetic"),
}
_OWNER = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_OWNER)


def __getattr__(name: str) -> Any:
    if name not in _OWNER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_OWNER[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
