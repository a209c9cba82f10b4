"""Export a trained model in Hugging Face format, atomically.

The export is what the next stage (RL, evaluation, serving) loads with nothing but
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`.
Everything is written into a temporary directory beside `out_dir` and renamed into place once complete,
so a crash never leaves a half-written export and an existing export is replaced only by a complete one
(the folder handling is in `aesl_lightning.infra.export_folder`).
The model is rebuilt from its config and a CPU copy of its state dict before saving; this handles models
loaded from GGUF (which refuse `save_pretrained`), parameters on an accelerator or in bf16, and gathered
(FSDP) state dicts alike, and never changes the model being trained.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from aesl_lightning.infra.export_folder import (  # noqa: F401 (the export API: these are imported from here)
    EXPORT_INFO_FILE, ExportTargetError, apply_umask_modes, atomic_directory, check_export_target, clean_stale_exports,
    current_umask, describe_export_target, export_files, write_info,
)
from aesl_lightning.infra.lora import LoRAConfig, is_peft_model, merge_lora_state_dict
from aesl_lightning.infra.lora import merge_lora as merge_lora_weights

log = logging.getLogger("aesl_lightning")

_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_export_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(_EXPORT_DTYPES)} or None (keep), got {dtype!r}")
    return _EXPORT_DTYPES[dtype]


def _cpu_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard from FSDP2 / tensor parallel
            tensor = tensor.full_tensor()
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        out[key] = tensor.to("cpu", target_dtype).contiguous()
    return out


def _export_config(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    # A GGUF-loaded model records how it was quantised; the export holds plain dequantised weights.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.use_cache = True  # training turns the KV cache off; inference wants it back
    return config


def _export_generation_config(
    generation_config: GenerationConfig | None, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> GenerationConfig:
    if generation_config is None:
        gen = GenerationConfig.from_model_config(config)
    else:
        gen = copy.deepcopy(generation_config)
    if tokenizer is not None:
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    gen.use_cache = True
    return gen



def _save_full(
    out_dir: Path,
    state_dict: dict[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    generation_config: GenerationConfig | None,
) -> None:
    config = _export_config(config)
    # Built on the meta device and filled by assignment: no random init, no second copy of the weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise KeyError(
            f"state dict does not match {type(model).__name__} built from its config: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    model.tie_weights()
    model.generation_config = _export_generation_config(generation_config, config, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    *,
    generation_config: GenerationConfig | None = None,
    dtype: str | torch.dtype | None = None,
    lora_config: LoRAConfig | None = None,
    overwrite: bool | None = None,
) -> Path:
    """Export a model known only by its state dict (e.g. gathered from FSDP) and its transformers config.

    Tensors may live on any device, in any dtype, or be DTensors; they are copied to CPU (cast to `dtype`
    if given). A peft state dict (keys with `lora_A` / `lora_B`) is merged with `lora_config`'s scaling.
    Returns `out_dir`. See `atomic_directory` for the replace and `overwrite` semantics.
    """
    check_export_target(out_dir, overwrite)  # refuse before copying any weights
    target_dtype = _resolve_export_dtype(dtype)
    has_lora = any(".lora_A." in k or ".lora_B." in k for k in state_dict)
    if has_lora:
        if lora_config is None:
            raise ValueError("export_state_dict: the state dict holds LoRA weights; pass lora_config to merge them")
        state_dict = merge_lora_state_dict(state_dict, lora_config)
    cpu_state = _cpu_state_dict(state_dict, target_dtype)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _save_full(tmp, cpu_state, config, tokenizer, generation_config)
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in cpu_state.values() if t.is_floating_point()})
        write_info(tmp, format="full", dtype=dtypes[0] if len(dtypes) == 1 else dtypes, merged_lora=has_lora)
    return out_dir


def export_hf(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    *,
    merge_lora: bool = True,
    dtype: str | torch.dtype | None = None,
    overwrite: bool | None = None,
) -> Path:
    """Write `model` (safetensors), `tokenizer` and the generation config to `out_dir` in Hugging Face format.

    A plain or GGUF-loaded model, or a peft model with `merge_lora=True` (adapters folded in on a copy, the
    training model is untouched), gives a full model that `AutoModelForCausalLM.from_pretrained(out_dir)`
    loads. A peft model with `merge_lora=False` gives only the adapter (`adapter_config.json`,
    `adapter_model.safetensors`) plus the tokenizer; load the base model and
    `peft.PeftModel.from_pretrained(base, out_dir)`, as `aesl_export.json` notes. `dtype` ("float32",
    "bfloat16", "float16") casts floating tensors; None keeps them. `overwrite`: None replaces only a missing
    or empty folder or a previous export, True any folder, False none (see `check_export_target`). Returns
    `out_dir`.
    """
    check_export_target(out_dir, overwrite)  # refuse before merging or copying any weights
    if is_peft_model(model) and not merge_lora:
        return _export_adapter(model, tokenizer, Path(out_dir), overwrite)
    if is_peft_model(model):
        model = merge_lora_weights(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"export_hf expects a transformers PreTrainedModel or peft PeftModel, got {type(model).__name__}"
        )
    return export_state_dict(
        model.state_dict(),
        model.config,
        tokenizer,
        out_dir,
        generation_config=model.generation_config,
        dtype=dtype,
        overwrite=overwrite,
    )


def _export_adapter(model, tokenizer, out_dir: Path, overwrite: bool | None) -> Path:
    base_name = model.peft_config["default"].base_model_name_or_path or model.get_base_model().config.name_or_path
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_info(
            tmp,
            format="peft-adapter",
            base_model=base_name or None,
            note="LoRA adapter only: load the base model, then peft.PeftModel.from_pretrained(base, this_directory)",
        )
    return out_dir
