"""What every training stage shares: a Hugging Face causal LM, its tokenizer, the optimiser and export.

`CausalLMModule` is the base of `SFTModule` (cold-start SFT) and the GRPO module. It loads the model
and tokenizer once, in `__init__`, so that `load_from_checkpoint` and the CLI rebuild the same system
from the hyper-parameters alone; everything a stage adds (its loss, its metrics) lives in the subclass. This
module never imports a subclass: checkpoints are read by `checkpoint_load` (every stage's configs allowed there),
and `export_checkpoint` imports the class a checkpoint names, if it is a CausalLMModule of the toolkit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch.optim.lr_scheduler import LambdaLR

from aesl_lightning.infra.lora import LoRAConfig, apply_lora
# load_checkpoint and UnsafeCheckpointError lived here; `aesl_lightning.lm.load_checkpoint` still finds them
from aesl_lightning.modules.checkpoint_load import UnsafeCheckpointError, load_checkpoint, register_safe_globals  # noqa: F401

Scheduler = Literal["cosine", "linear", "constant"]


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int, scheduler: Scheduler, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step `step`.

    Linear warm-up from 0 to 1 over `warmup_steps`, then `cosine` (1 -> min_lr_ratio along half a cosine),
    `linear` (1 -> min_lr_ratio) or `constant` (stays 1) until `total_steps`; flat at the end value after.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if scheduler == "linear":
        shape = 1.0 - progress
    elif scheduler == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"scheduler must be 'cosine', 'linear' or 'constant', got {scheduler!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class CausalLMModule(L.LightningModule):
    """A Hugging Face causal LM with its tokenizer, AdamW with warm-up and decay, and Hugging Face export.

    Args:
        name_or_path: Model to start from: a built-in name (smollm2-135m-instruct, tiny-llama,
            tiny-qwen2), a local Hugging Face directory, or a hub id.
        gguf_file: GGUF file inside `name_or_path` to load (dequantised on load).
        dtype: Parameter dtype when loading: float32, bfloat16, float16 or auto.
        attn_implementation: Attention kernel passed to transformers (eager, sdpa, ...); None = its default.
        gradient_checkpointing: Recompute activations in backward to save memory.
        trust_remote_code: Allow model code shipped with a hub checkpoint to run. Off unless you trust it.
        lora: LoRA adapter settings; None trains all parameters.
        sharded_load: Build the model on the meta device in `__init__` and load its weights in `configure_model`,
            after sharding: under FSDP2 (`ModelParallelStrategy`) rank 0 reads the checkpoint and sends each rank
            its shards, so no other rank ever holds the full model. Elsewhere (one device, DDP, FSDP1) the
            weights are loaded whole when the model is configured. Frozen reference / base copies are not
            affected. The model has no weights before `configure_model` (fit, validate, test) has run.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to norms and biases).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimiser steps; a value below 1 is a fraction of all steps.
        scheduler: Decay after warm-up: cosine, linear or constant.
        min_lr_ratio: Final learning rate as a fraction of `lr` (cosine and linear decay).
    """

    def __init__(
        self,
        name_or_path: str = "smollm2-135m-instruct",
        gguf_file: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lora: LoRAConfig | None = None,
        sharded_load: bool = False,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.1,
        scheduler: Scheduler = "cosine",
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        from aesl_lightning.infra.models import load_tokenizer

        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        self.tokenizer = load_tokenizer(name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        self._model_args = dict(name_or_path=name_or_path, gguf_file=gguf_file, dtype=dtype,
                                attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing,
                                trust_remote_code=trust_remote_code)
        self._lora, self._weights_pending, self._sharded_load = lora, sharded_load, sharded_load
        self.model = self._build_model(empty=sharded_load)

    def _build_model(self, empty: bool = False, frozen: bool = False) -> torch.nn.Module:
        """The starting model (with fresh LoRA adapters), in train mode; on the meta device if `empty`. `frozen`:
        the plain starting model instead (no adapters, no gradient checkpointing), in eval mode, no grad."""
        from aesl_lightning.infra.models import empty_causal_lm, load_causal_lm

        args = {**self._model_args, "gradient_checkpointing": False} if frozen else self._model_args
        model = (empty_causal_lm if empty else load_causal_lm)(**args)
        if frozen:
            return model.eval().requires_grad_(False)
        model.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds
        return apply_lora(model, self._lora) if self._lora is not None else model

    def _load_pending_weights(self) -> None:
        """`sharded_load`: the starting weights into the (possibly FSDP2-sharded) meta model; rank 0 alone reads
        them when sharded. Runs once, in `configure_model`."""
        from aesl_lightning.infra.fsdp import is_sharded, materialize

        if not self._weights_pending:
            return
        self._weights_pending = False
        state = None
        if not is_sharded(self.model) or self.global_rank == 0:
            state = self._build_model().state_dict()
        materialize(self.model, state, self._root_device())

    def _root_device(self) -> torch.device:
        return self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    def load_frozen_start(self) -> torch.nn.Module:
        """A fresh, frozen (eval, no grad) copy of the starting model on the module's device, loaded from the
        hyper-parameters, never from the current weights: the reference for KL terms, also right after a resume.

        With `sharded_load` under FSDP2 (a device mesh) the copy is sharded like the policy: built on the meta
        device, rank 0 alone reads the weights and each rank receives its shards, so no rank holds a whole copy.
        Its forward is then a collective: every rank must run it. Elsewhere it is a full copy per process."""
        from aesl_lightning.infra.fsdp import materialize, shard_model

        if not (self._sharded_load and self.device_mesh is not None):
            return self._build_model(frozen=True).to(self._root_device())
        model = self._build_model(empty=True, frozen=True)
        shard_model(model, self.device_mesh["data_parallel"])
        state = self._build_model(frozen=True).state_dict() if self.global_rank == 0 else None
        return materialize(model, state, self._root_device()).eval()

    def configure_model(self) -> None:
        """Shard the model for the strategy (Lightning calls this for every stage; sharding happens once):

        - `ModelParallelStrategy`: FSDP2, `fully_shard` on each decoder layer, then the root.
        - `FSDPStrategy`: FSDP1, `self.model` becomes the root `FullyShardedDataParallel` (the strategy's settings
          and `auto_wrap_policy`, else one unit per decoder layer), so Lightning leaves the LightningModule
          unwrapped; see `aesl_lightning.infra.fsdp`. `unwrap(self.model)` is the transformers / peft model.

        Nothing to do on one device or under DDP.
        """
        from aesl_lightning.infra.fsdp import is_sharded, shard_model, wrap_fsdp1

        if self.device_mesh is not None:
            shard_model(self.model, self.device_mesh["data_parallel"])
            self._load_pending_weights()  # sharded_load: rank 0 reads, each rank receives its shards
            return
        self._load_pending_weights()  # sharded_load elsewhere: the whole weights on every rank
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy) and not is_sharded(self.model):
            if not strategy.kwargs.get("use_orig_params", True):
                raise ValueError("FSDPStrategy(use_orig_params=False) is not supported: LoRA's frozen and trainable "
                                 "weights share FSDP units and the optimizer needs the original parameters")
            # FSDP1 flattens each parameter into a 1-D shard; weight decay goes by the original dimensions
            self._unsharded_ndim = {id(p): p.ndim for p in self.model.parameters()}
            self.model = wrap_fsdp1(self.model, strategy.kwargs.get("auto_wrap_policy"))

    @_restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=None, **kwargs):
        """Lightning's `load_from_checkpoint`, except that names the checkpoint's hyper-parameters hold are not
        imported (`aesl_lightning.infra.checkpoint_io.checkpoint_names`): a reward function other than the built-ins is
        allowed only if passed here (`grpo=GRPOConfig(reward_funcs=[...])`), else it is kept as a name that refuses
        to be called. With `hparams_file` (the caller's own settings) nothing is restricted."""
        from lightning.pytorch.core.saving import _load_from_checkpoint

        from aesl_lightning.infra.checkpoint_io import checkpoint_names

        def load():
            return _load_from_checkpoint(cls, checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)

        if hparams_file is not None:
            return load()
        names = getattr(kwargs.get("grpo"), "reward_funcs", None) or []
        with checkpoint_names({str(n).replace(":", ".") for n in names}, f"checkpoint {checkpoint_path}"):
            return load()

    def on_fit_start(self) -> None:
        """Fresh metric states, made outside inference mode: a `trainer.validate()` before `fit()` resets them under
        `torch.inference_mode`, and torchmetrics' in-place updates of such tensors fail in fit's no-grad validation.
        Checkpoints are saved atomically and a kill's leftovers are removed (`checkpoint_io.prepare_checkpointing`)."""
        from torchmetrics import Metric

        from aesl_lightning.infra.checkpoint_io import prepare_checkpointing

        prepare_checkpointing(self.trainer)

        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except by norm under FSDP1, which Lightning's FSDP precision plugin refuses (a norm
        over one rank's shards is wrong): there the root's `clip_grad_norm_` reduces the norm over ranks."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        by_norm = (gradient_clip_algorithm or "norm") == "norm"
        if gradient_clip_val and by_norm and isinstance(self.model, FullyShardedDataParallel):
            self.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        ndim = getattr(self, "_unsharded_ndim", {})
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if ndim.get(id(param), param.ndim) >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        warmup = int(round(hp.warmup_steps * total)) if hp.warmup_steps < 1 else int(hp.warmup_steps)
        schedule = LambdaLR(
            optimizer, lambda step: warmup_decay_factor(step, warmup, total, hp.scheduler, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- export
    def export_hf(self, out_dir: str | Path, merge_lora: bool | None = None, overwrite: bool | None = None) -> Path:
        """Write the current weights and tokenizer in Hugging Face format (atomically) and return the folder.

        The result reloads with plain `AutoModelForCausalLM.from_pretrained(out_dir)`. LoRA adapters are
        merged unless `merge_lora=False` or the LoRA config says otherwise. Under FSDP (2 or 1) the shards are
        gathered first, which is collective: every rank must call this (rank 0 writes), and LoRA adapters are
        always merged. `overwrite`: None replaces only an empty folder or a previous export, True any folder
        (see `aesl_lightning.infra.export.check_export_target`).
        """
        from aesl_lightning.infra.export import export_hf, export_state_dict
        from aesl_lightning.infra.fsdp import full_state_dict, is_sharded, unwrap
        from aesl_lightning.infra.lora import is_peft_model

        lora = self.hparams.get("lora")
        if merge_lora is None:
            merge_lora = True if lora is None else bool(getattr(lora, "merge_on_export", True))
        if not is_sharded(self.model):
            return export_hf(self.model, self.tokenizer, out_dir, merge_lora=merge_lora, overwrite=overwrite)
        state = full_state_dict(self.model)
        if self.global_rank == 0:
            model = unwrap(self.model)
            base = model.get_base_model() if is_peft_model(model) else model
            export_state_dict(state, base.config, self.tokenizer, out_dir, generation_config=base.generation_config,
                              lora_config=lora, overwrite=overwrite)  # gathered adapters are always merged
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return Path(out_dir)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        cls = type(self)
        checkpoint["aesl_lightning"] = {"module_class": f"{cls.__module__}.{cls.__qualname__}"}
        if self._trainer is not None:
            mark_validation_pending(self.trainer, checkpoint)


def mark_validation_pending(trainer: L.Trainer, checkpoint: dict) -> bool:
    """Make a checkpoint saved after a training step that a validation follows resume *into* that validation.

    Lightning, resuming from a checkpoint written at the end of a training batch (e.g.
    `ModelCheckpoint(every_n_train_steps=...)`), fast-forwards past the validation due at that step, so a kill
    during it loses that validation (its metrics, and the turning-point decision it feeds). Here the saved
    progress of the validation loop is marked as started and not finished (started = ready = processed + 1,
    completed = processed; Lightning's "restarted mid-evaluation" state, from its first batch) and the training
    batch as completed (as in a checkpoint Lightning writes during validation), and the resumed run runs the
    validation. Returns whether it marked; does nothing if Lightning's internals are not as expected.
    """
    try:
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.batch_progress.total
        at_batch_end = trainer.training and progress.processed == progress.completed + 1
        if not at_batch_end or not epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return False
        if trainer.fit_loop.epoch_loop.val_loop.skip:
            return False
        loops = checkpoint["loops"]["fit_loop"]
        train, val = loops["epoch_loop.batch_progress"], loops["epoch_loop.val_loop.batch_progress"]
    except (AttributeError, KeyError, TypeError):
        return False
    # the training batch counts as completed, as in a checkpoint Lightning writes during validation (else the
    # restart would count the batch twice in the loggers' step)
    for progress in (train["total"], train["current"]):
        progress["completed"] = progress["processed"]
    total = val["total"]
    total["ready"] = total["started"] = total["processed"] + 1
    total["completed"] = total["processed"]
    val["current"].update(ready=1, started=1, processed=0, completed=0)
    return True


def _module_class(meta: object, ckpt_path: Path) -> type[CausalLMModule]:
    """The module class a checkpoint names, if it is one of the toolkit's (`aesl_lightning.*`, a CausalLMModule)."""
    import importlib

    name = meta.get("module_class") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{ckpt_path}: not written by aesl-lightning (no 'aesl_lightning.module_class' entry); "
            "export from Python with YourModule.load_from_checkpoint(path).export_hf(out_dir)"
        )
    module_path, _, class_name = name.rpartition(".")
    # Importing a module runs its code: only the toolkit's own modules are imported on a checkpoint's word.
    if not re.fullmatch(r"aesl_lightning(\.[A-Za-z_]\w*)+", module_path) or not class_name.isidentifier():
        raise UnsafeCheckpointError(
            f"{ckpt_path}: names module class {name!r}, outside aesl_lightning; the export subcommand imports only "
            "the toolkit's modules. For your own subclass: YourModule.load_from_checkpoint(path).export_hf(out_dir)"
        )
    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{ckpt_path}: module class {name!r} not found ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, CausalLMModule)):
        raise UnsafeCheckpointError(f"{ckpt_path}: module class {name!r} is not a CausalLMModule")
    return cls


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, merge_lora: bool | None = None, *,
    overwrite: bool | None = None, trust_remote_code: bool = False,
) -> Path:
    """Rebuild the module saved in a toolkit checkpoint and export its weights in Hugging Face format.

    The checkpoint is read with `torch.load(weights_only=True)` only (`load_checkpoint`); its module class
    must be one of the toolkit's; a checkpoint whose hyper-parameters ask for `trust_remote_code` is refused
    unless `trust_remote_code=True` is passed here too (it would run the hub repository's code).
    `overwrite` as in `aesl_lightning.infra.export.check_export_target`, checked before the model is built.
    """
    from aesl_lightning.infra.export import check_export_target

    ckpt_path = Path(ckpt_path)
    check_export_target(out_dir, overwrite)
    checkpoint = load_checkpoint(ckpt_path)
    module_cls = _module_class(checkpoint.get("aesl_lightning"), ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if hparams.get("trust_remote_code") and not trust_remote_code:
        raise UnsafeCheckpointError(
            f"{ckpt_path}: its hyper-parameters set trust_remote_code=True for {hparams.get('name_or_path')!r}, which "
            "runs code from that model repository; pass --trust-remote-code (trust_remote_code=True) if you trust it"
        )
    del checkpoint
    module = module_cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return module.export_hf(out_dir, merge_lora=merge_lora, overwrite=overwrite)
