"""Export a trained model in Hugging Face format, atomically.

The export is what the next stage (RL, evaluation, serving) loads with nothing but
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`.
Everything is written into a temporary directory beside `out_dir` and renamed into place once complete,
so a crash never leaves a half-written export and an existing export is replaced only by a complete one.
The model is rebuilt from its config and a CPU copy of its state dict before saving; this handles models
loaded from GGUF (which refuse `save_pretrained`), parameters on an accelerator or in bf16, and gathered
(FSDP) state dicts alike, and never changes the model being trained.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from aesl_lightning import __version__
from aesl_lightning.lora import LoRAConfig, is_peft_model, merge_lora_state_dict
from aesl_lightning.lora import merge_lora as merge_lora_weights

EXPORT_INFO_FILE = "aesl_export.json"
"""Small JSON written into every export: its format ("full" or "peft-adapter"), dtype and toolkit version."""

log = logging.getLogger("aesl_lightning")

_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportTargetError(FileExistsError):
    """The export folder holds something that is not a previous export; the message says what and how to proceed."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the classic read: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def apply_umask_modes(root: Path) -> None:
    """Give `root` and everything below it the modes a plain `open()` / `mkdir()` would: 0o666 (files) and
    0o777 (folders) minus the umask. Libraries that write through `mkstemp` leave 0o600 files behind."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def export_files(directory: Path) -> list[str]:
    """Relative paths (POSIX) of every file below `directory` except the marker, sorted."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir() and p.name != EXPORT_INFO_FILE
    )


def describe_export_target(out_dir: Path) -> str | None:
    """None when `out_dir` may be replaced by an export (it does not exist, is empty, or is a previous export
    holding only the files its marker lists); else why not, for the error message.

    A previous export is recognised by the marker `aesl_export.json` it wrote (`"exported_by": "aesl-lightning
    ..."`); its `files` list (exports without one are accepted on the marker alone) must cover every file in
    the folder, so files a user added to an export folder are never deleted without `overwrite=True`.
    """
    if not out_dir.exists():
        return None
    if out_dir.is_symlink() or not out_dir.is_dir():
        return "it exists and is not a directory (or is a symbolic link)"
    entries = list(out_dir.iterdir())
    if not entries:
        return None
    if not _has_marker(out_dir):
        names = sorted(p.name for p in entries)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"it is not empty and not an aesl-lightning export (no {EXPORT_INFO_FILE} marker); it holds {shown}"
    listed = json.loads((out_dir / EXPORT_INFO_FILE).read_text(encoding="utf-8")).get("files")
    if isinstance(listed, list):
        extra = sorted(set(export_files(out_dir)) - {str(f) for f in listed})
        if extra:
            return f"it is a previous export, but also holds files the export did not write: {', '.join(extra[:5])}"
    return None


def check_export_target(out_dir: str | os.PathLike, overwrite: bool | None = None) -> None:
    """Raise `ExportTargetError` (or NotADirectoryError) if an export to `out_dir` may not replace what is there.

    `overwrite=None` (the default): replace only a missing or empty folder or a previous export (see
    `describe_export_target`); `True`: replace any folder; `False`: never replace (a later export is discarded).
    Call it before the expensive part of an export so that a refusal comes at once.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir.is_symlink() or not out_dir.is_dir()):
        raise NotADirectoryError(f"export target {out_dir} exists and is not a directory (or is a symbolic link); "
                                 "choose another folder")
    if overwrite is None:
        why = describe_export_target(out_dir)
        if why is not None:
            raise ExportTargetError(
                f"export target {out_dir}: refusing to replace it: {why}. Choose an empty or new folder, or pass "
                "overwrite=True (CLI: --overwrite) to replace it with everything in it"
            )


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` (holding only an "incomplete" marker); on success it becomes
    `out_dir`.

    On an exception the temporary directory is removed and `out_dir` is left as it was. An existing
    `out_dir` is moved aside and deleted only after the new one is in place, and only as `overwrite`
    allows (see `check_export_target`; checked before and again at the rename): `None` replaces an empty
    folder or a previous export, `True` anything, and `False` keeps an `out_dir` that exists by the time
    of the rename (another process won the race) and discards the new copy. The temporary directory is
    named `.<name>.tmp-<pid>-<hex>`; `clean_stale_exports` removes those left by killed processes.
    Files and folders get the umask's modes (`apply_umask_modes`).
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_exports(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: that would make the final directory private (0700)
    try:
        # marked at once, so that the leftover of a killed export is recognisable (`clean_stale_exports`)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps({"exported_by": f"aesl-lightning {__version__}", "status": "incomplete"}))
        yield tmp
        apply_umask_modes(tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clean_stale_exports(out_dir)  # an `.old-` copy kept while out_dir was missing is stale now


_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_exports(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of killed exports to `out_dir` and return them.

    A leftover is a folder beside `out_dir` named `.<name>.tmp-<pid>-<8 hex>` or `.<name>.old-<pid>-<8 hex>`
    (the names `atomic_directory` gives them) whose process `<pid>` is no longer running, and which carries
    the toolkit's marker (`aesl_export.json` with `exported_by: aesl-lightning`, written first into every
    temporary folder) or is empty. An `.old-` folder (a previous export moved aside) is removed only once
    `out_dir` exists again; if a kill came between the two renames it is the only copy and is kept (a warning
    says where). Anything else, including a live process's folder, is left alone.
    """
    out_dir = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}({re.escape(_TMP_INFIX)}|{re.escape(_OLD_INFIX)})(\d+)-[0-9a-f]{{8}}$")
    removed: list[Path] = []
    if not out_dir.parent.is_dir():
        return removed
    for candidate in sorted(out_dir.parent.iterdir()):
        match = pattern.match(candidate.name)
        if not match or candidate.is_symlink() or not candidate.is_dir():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if not (_has_marker(candidate) or not any(candidate.iterdir())):
            continue  # the name matches but the content is not ours
        if match.group(1) == _OLD_INFIX and not out_dir.exists():
            log.warning("%s holds the previous export of %s (an export was killed while swapping them); move it "
                        "back by hand if you want it", candidate, out_dir)
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    if removed:
        log.info("removed %d leftover(s) of interrupted exports: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def _has_marker(folder: Path) -> bool:
    try:
        info = json.loads((folder / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and str(info.get("exported_by", "")).startswith("aesl-lightning")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool | None) -> None:
    if not out_dir.exists():
        try:
            os.rename(tmp, out_dir)
            return
        except OSError:
            if not out_dir.exists():
                raise
            # Another process created out_dir between the check and the rename.
    if overwrite is False:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    check_export_target(out_dir, overwrite)  # again: it may have changed while the export was written
    old = out_dir.parent / f".{out_dir.name}{_OLD_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


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


def _write_info(out_dir: Path, **info) -> None:
    """The marker: who wrote the export, its format, and the files it holds (`describe_export_target` reads it)."""
    info = {"exported_by": f"aesl-lightning {__version__}", **info, "files": export_files(out_dir)}
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


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
        _write_info(tmp, format="full", dtype=dtypes[0] if len(dtypes) == 1 else dtypes, merged_lora=has_lora)
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
        _write_info(
            tmp,
            format="peft-adapter",
            base_model=base_name or None,
            note="LoRA adapter only: load the base model, then peft.PeftModel.from_pretrained(base, this_directory)",
        )
    return out_dir
