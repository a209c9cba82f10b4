"""Reading a toolkit checkpoint without running code: `torch.load(weights_only=True)` with the toolkit's config
dataclasses allowed, under their names now and under the names older checkpoints pickled them with.

The configs are imported here, by name, from the modules that define them, so that the base module
(`aesl_lightning.modules.lm`) reads every stage's checkpoints without importing its subclasses.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from aesl_lightning._compat import old_names
from aesl_lightning.infra.generation import SamplingConfig
from aesl_lightning.infra.lora import LoRAConfig
from aesl_lightning.maths.loss_config import LossConfig
from aesl_lightning.modules.evaluation import ValidationGeneration
from aesl_lightning.modules.grpo_config import GRPOConfig, GRPOEvaluation

CHECKPOINT_CLASSES = (LossConfig, LoRAConfig, SamplingConfig, ValidationGeneration, GRPOConfig, GRPOEvaluation)
"""The classes a toolkit checkpoint's hyper-parameters hold besides tensors, numbers, strings and containers."""

# names from before a class left the module it was defined in: GRPOConfig and GRPOEvaluation were in grpo.py,
# LossConfig in losses.py (whose old name now stands for maths/losses.py, not maths/loss_config.py)
_EARLIER_NAMES = {GRPOConfig: ["aesl_lightning.grpo.GRPOConfig"],
                  GRPOEvaluation: ["aesl_lightning.grpo.GRPOEvaluation"],
                  LossConfig: ["aesl_lightning.losses.LossConfig"]}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that `torch.load(weights_only=True)` refuses (it would run code) or that names code to run."""


def checkpoint_class_names(cls: type) -> list[str]:
    """Every name a checkpoint may pickle `cls` under: its module's now, its module's old flat name
    (`aesl_lightning.losses.LossConfig`), and the earlier names some classes had."""
    modules = [cls.__module__, *old_names(cls.__module__)]
    return [f"{module}.{cls.__qualname__}" for module in modules] + _EARLIER_NAMES.get(cls, [])


def register_safe_globals() -> None:
    """Allow `CHECKPOINT_CLASSES` in `torch.load(weights_only=True)` under each of `checkpoint_class_names`
    (Lightning's own loading when resuming uses it too). Idempotent; runs when this module is imported."""
    names = [(cls, name) for cls in CHECKPOINT_CLASSES for name in checkpoint_class_names(cls)]
    torch.serialization.add_safe_globals(names)


register_safe_globals()


def load_checkpoint(path: str | Path, *, mmap: bool = True) -> dict:
    """`torch.load(path, weights_only=True)` on CPU: tensors, containers, primitives and the toolkit's config
    dataclasses only, so a crafted checkpoint cannot run code. Raises `FileNotFoundError` for a missing file and
    `UnsafeCheckpointError` (naming the file and the refused object) for anything else the safe loader refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UnsafeCheckpointError(
            f"{path}: refused to load: torch.load(weights_only=True) rejects it ({reason[:300]}). aesl-lightning "
            "never unpickles arbitrary objects; a checkpoint it wrote holds only tensors, numbers, strings and its "
            "config dataclasses"
        ) from None
    if not isinstance(checkpoint, dict):
        raise UnsafeCheckpointError(
            f"{path}: expected a Lightning checkpoint (a dict), found {type(checkpoint).__name__}")
    return checkpoint
