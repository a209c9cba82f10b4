"""LoRA adapters through `peft`: apply, merge, and switch off.

A LoRA layer replaces a frozen linear weight W (out x in) by W + (alpha / r) * B A, with A (r x in) and
B (out x r) trainable and B initialised to zero, so the adapted model starts as the base model.
Merging folds the product back into W; with the adapters switched off the model is the base model,
which GRPO uses as its frozen reference policy at no extra memory. `merged_adapters` folds them in for the
length of a block (GRPO samples its rollouts that way: one matmul per linear instead of three) and restores
the original weight tensors afterwards, bit for bit.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The linear layers of a Llama / Qwen2 decoder block, for `target_modules` when "all-linear" is not wanted."""


@dataclass
class LoRAConfig:
    """Low-rank adapters on the linear layers of a causal LM.

    Args:
        r: Rank of the low-rank update B A.
        alpha: Scale numerator: the update is (alpha / r) * B A.
        dropout: Dropout on the adapter input during training.
        target_modules: Module names to adapt, or "all-linear" for every linear layer except the LM head.
        bias: Which biases train: "none", "all" or "lora_only".
        merge_on_export: Fold the adapters into the base weights when exporting, so the export is a plain model.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    merge_on_export: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoRAConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")

    @property
    def scaling(self) -> float:
        """alpha / r, the factor in W + (alpha / r) * B A."""
        return self.alpha / self.r

    def to_peft(self) -> PeftLoraConfig:
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return PeftLoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target,
            bias=self.bias,
            task_type="CAUSAL_LM",
        )


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (carries adapters that can be merged or switched off)."""
    return isinstance(model, PeftModel)


def apply_lora(model: PreTrainedModel, config: LoRAConfig) -> PeftModel:
    """Wrap `model` with LoRA adapters; afterwards only the adapter parameters (and biases per `config.bias`) train.

    The base weights are frozen in place (the returned PeftModel shares them with `model`).
    """
    if is_peft_model(model):
        raise ValueError("apply_lora: the model already carries peft adapters; apply LoRA to the base model once")
    return get_peft_model(model, config.to_peft())


def merge_lora(model: torch.nn.Module, *, inplace: bool = False) -> PreTrainedModel:
    """A plain transformers model whose weights are W + (alpha / r) * B A, without any LoRA modules.

    By default the merge happens on a deep copy, so a model that is still training keeps its adapters,
    optimizer references and frozen base weights untouched; this costs one extra copy of the model in
    memory (on the model's device). `inplace=True` merges into `model` itself and unloads the adapters
    (no extra memory; `model` must not be trained further). A model without adapters is returned as is.
    """
    if not is_peft_model(model):
        return model
    target = model if inplace else copy.deepcopy(model)
    return target.merge_and_unload()


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, `model` computes the base model (adapters bypassed, weights untouched).

    GRPO uses this as the frozen reference policy. For a model without adapters there is no base
    behaviour to return to, and silently yielding the trained model would make KL(policy || reference)
    zero, so this raises `TypeError`; keep a frozen copy as the reference instead (check `is_peft_model`).
    """
    if not is_peft_model(model):
        raise TypeError(
            f"adapters_disabled needs a peft model with LoRA adapters, got {type(model).__name__}; "
            "a fully fine-tuned model has no base behaviour to switch back to: keep a frozen copy as reference"
        )
    with model.disable_adapter():
        yield model


@contextmanager
def merged_adapters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block every LoRA layer of `model` computes with one merged weight W' = W + (alpha / r) * B A
    (peft's own merge, `safe_merge`: into a new tensor, checked finite); on exit, also after an exception, each
    layer gets back its original W tensor (bit-exact, no W' - (alpha / r) * B A round trip) and its adapters
    unmerged. The parameters stay the same objects, so optimizer state and references are untouched.

    For sampling, not training: gradients do not reach A and B inside the block. Costs one extra copy of the
    adapted weights while it lasts. A model without adapters is yielded as is; a model whose adapters are
    switched off (`adapters_disabled`) or already merged is left alone.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if is_peft_model(model) else []
    if not layers or any(layer.merged or layer.disable_adapters for layer in layers):
        yield model
        return
    saved = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            bias = getattr(base, "bias", None)
            # registered before merging, so that a failure half-way still restores what was replaced
            saved.append((layer, base.weight, base.weight.data, bias, bias.data if bias is not None else None))
            with torch.no_grad():  # B A of trainable factors: no graph into the merged weight
                layer.merge(safe_merge=True)
        yield model
    finally:
        for layer, weight, original, bias, original_bias in saved:
            weight.data = original
            if bias is not None:
                bias.data = original_bias
            layer.merged_adapters.clear()


_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def merge_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: LoRAConfig, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Fold LoRA weights of a peft state dict into plain transformers keys: W <- W + (alpha / r) * B A.

    For when only a (gathered, e.g. FSDP) state dict of a `PeftModel` exists. Keys may carry any prefix up
    to `base_model.model.` (that prefix and everything before it are stripped); `*.base_layer.*` keys
    become the plain module keys. The merge is computed in float32 and cast back to W's dtype.
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if _PEFT_PREFIX in key:
            key = key.split(_PEFT_PREFIX, 1)[1]
        match = _LORA_KEY.match(key)
        if match:
            if match["adapter"] == adapter_name:
                lora.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        plain[key.replace(".base_layer.", ".")] = tensor
    for module, pair in lora.items():
        weight_key = f"{module}.weight"
        if set(pair) != {"A", "B"} or weight_key not in plain:
            raise KeyError(f"merge_lora_state_dict: incomplete LoRA weights for {module!r}: found {sorted(pair)}")
        weight = plain[weight_key]
        delta = pair["B"].to(weight.device, torch.float32) @ pair["A"].to(weight.device, torch.float32)
        plain[weight_key] = (weight.to(torch.float32) + config.scaling * delta).to(weight.dtype)
    return plain
