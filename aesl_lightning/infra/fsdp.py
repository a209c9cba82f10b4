"""Sharded training of Hugging Face causal LMs: FSDP2 and FSDP1, each decoder layer one unit; generation with
gathered weights; full state dicts for the Hugging Face export.

FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's `ModelParallelStrategy`, the recommended one:

    Trainer(accelerator="cpu", devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))

shards over gloo on CPU (NCCL on GPUs). Each decoder layer becomes one FSDP unit, then the root holds
the rest (embeddings, final norm, LM head, tied or not): its parameters are all-gathered just before the
unit runs and freed after, so at most one layer's full weights exist at a time.

FSDP1 (`torch.distributed.fsdp.FullyShardedDataParallel`) under Lightning's `FSDPStrategy` (CUDA only in
Lightning):

    Trainer(accelerator="cuda", devices=2, strategy=FSDPStrategy(auto_wrap_policy=decoder_layer_classes(model)))

`CausalLMModule.configure_model` wraps `self.model` itself (it becomes the FSDP1 root, with the strategy's
settings), with the strategy's `auto_wrap_policy` or, without one, each decoder layer one unit: the same layout
as FSDP2, so plain `strategy="fsdp"` does the same. Lightning then leaves the LightningModule unwrapped (its
warning that the policy "will be ignored" is about that outer wrap: configure_model has applied it). Left to
Lightning, the whole LightningModule would be the root and `training_step` would run inside its forward, where
GRPO's manual backward fails (FSDP1 asserts "Expects `BACKWARD_PRE` or `BACKWARD_POST` state but got
HandleTrainingState.FORWARD").
`use_orig_params=False` is refused (LoRA's frozen and trainable weights share units). Gradient clipping by
norm uses the root's `clip_grad_norm_` (`CausalLMModule.configure_gradient_clipping`). With
`activation_checkpointing_policy=decoder_layer_classes(model)` the strategy also recomputes each layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def _fsdp_module_class():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _fsdp1_class():
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` or any of its submodules is an FSDP2 unit or an FSDP1 `FullyShardedDataParallel`."""
    classes = (_fsdp_module_class(), _fsdp1_class())
    return any(isinstance(m, classes) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside an FSDP1 wrapper (the transformers or peft model, for type checks and peft's
    adapter switches); any other `model` as is (FSDP2 keeps the module's class). Run forwards on the wrapper."""
    return model.module if isinstance(model, _fsdp1_class()) else model


def fsdp1_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost FSDP1 instances in `model` (`model` itself if it is one), in module order."""
    fsdp1 = _fsdp1_class()
    if isinstance(model, fsdp1):
        return [model]
    return [m for child in model.children() for m in fsdp1_roots(child)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a (possibly peft-wrapped) transformers model: the modules whose class is named in
    the model's `_no_split_modules` (e.g. `LlamaDecoderLayer`), in order."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found (no module class listed in `_no_split_modules`); "
            "shard this model by hand with torch.distributed.fsdp.fully_shard"
        )
    return layers


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of `decoder_layers(model)`, e.g. {LlamaDecoderLayer}: the recommended FSDP1 units,
    `FSDPStrategy(auto_wrap_policy=decoder_layer_classes(model))` (also as `activation_checkpointing_policy`)."""
    return {type(layer) for layer in decoder_layers(model)}


def shard_model(model: nn.Module, mesh, **fsdp_kwargs) -> nn.Module:
    """`fully_shard` every decoder layer, then the root, over `mesh` (a 1-D data-parallel DeviceMesh); in place.

    The root is the transformers model, also inside a peft model: `generate` runs its forward, not peft's,
    and FSDP2 makes whichever unit runs forward first the root (a layer, if the root were the peft wrapper,
    and the next training forward would fail). Idempotent: an already sharded model is returned unchanged
    (Lightning calls `configure_model` for every stage). `fsdp_kwargs` go to `fully_shard` (e.g. `mp_policy`,
    `reshard_after_forward`).
    """
    from torch.distributed.fsdp import fully_shard

    from aesl_lightning.infra.lora import is_peft_model

    if is_sharded(model):
        return model
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model.get_base_model() if is_peft_model(model) else model, mesh=mesh, **fsdp_kwargs)
    return model


def materialize(model: nn.Module, state: dict[str, torch.Tensor] | None, device: torch.device | str = "cpu") -> nn.Module:
    """Give a model built on the meta device (`aesl_lightning.infra.models.empty_causal_lm`) real weights, in place.

    Sharded with FSDP2: each rank allocates only its own shards and receives them from rank 0, which alone
    passes the full `state` (`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`; every other
    rank passes None and never holds the full model). Unsharded: `state` is copied in (ties restored first).
    Buffers computed at construction (rotary frequencies) keep their values.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if is_sharded(model):
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if dist.get_rank() == 0 and state is None:
            raise ValueError("materialize: rank 0 must pass the full state dict to broadcast")
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, state if dist.get_rank() == 0 else {}, options=options)
        return model
    from aesl_lightning.infra.lora import is_peft_model

    (model.get_base_model() if is_peft_model(model) else model).tie_weights()  # to_empty unties shared weights
    model.load_state_dict(state)
    return model


def wrap_fsdp1(model: nn.Module, auto_wrap_policy=None) -> nn.Module:
    """`model` as the root of FSDP1 units, with the settings of the enclosing `enable_wrap` context (Lightning's
    `FSDPStrategy.model_sharded_context`, entered around `configure_model`): `auto_wrap_policy`, else the
    strategy's, else one unit per decoder layer. Idempotent: a sharded model is returned unchanged."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, wrap

    if is_sharded(model):
        return model
    wrapped = wrap(model, auto_wrap_policy=auto_wrap_policy or ModuleWrapPolicy(decoder_layer_classes(model)))
    if wrapped is model:  # outside an enable_wrap context, wrap() is a silent no-op
        raise RuntimeError("wrap_fsdp1 needs an enclosing torch.distributed.fsdp.wrap.enable_wrap context (Lightning's "
                           "FSDPStrategy enters one around configure_model); else wrap with FullyShardedDataParallel(...)")
    return wrapped


@contextmanager
def unsharded_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every FSDP unit of `model` holds its full parameters, so `generate` moves no weights;
    each unit reshards on exit. A no-op for a model that is not sharded.

    All units, not only the root: with only the root unsharded, every layer still all-gathers its weights at
    every generated token. (transformers' `generate` keeps the ranks of an FSDP-managed model in step,
    `synced_gpus`: one all-reduce of a "finished" flag per token, and ranks that are done run idle forwards
    until the last one finishes, so uneven lengths end together; without it they would deadlock.)
    The gathered weights are all held at once, so the whole model must fit in memory on each rank while
    generating (the usual trade-off for fast rollouts). Every rank must enter the block (unshard is a
    collective); what happens inside may differ per rank.

    FSDP1: `summon_full_params` on the outermost instances (which must own all of `model`'s parameters: pass
    the FSDP1 root or a module that contains it), with the wrappers' forwards bypassed inside the block (an
    FSDP1 forward reshards its unit afterwards, so the next token would all-gather again). Forward only:
    no backward inside the block; with mixed precision the gathered weights are in full precision.
    """
    roots = fsdp1_roots(model)
    if roots:
        with _fsdp1_unsharded(roots):
            yield model
        return
    fsdp_module = _fsdp_module_class()
    units = [m for m in model.modules() if isinstance(m, fsdp_module)]
    if not units:
        yield model
        return
    # A forward reshards its unit afterwards by default; keep every unit gathered for the whole rollout.
    previous = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    handles = [unit.unshard(async_op=True) for unit in units]
    for handle in handles:
        if handle is not None:
            handle.wait()
    try:
        yield model
    finally:
        for unit, reshard in zip(units, previous):
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


@contextmanager
def _fsdp1_unsharded(roots: list[nn.Module]) -> Iterator[None]:
    fsdp1 = _fsdp1_class()
    units = [m for root in roots for m in root.modules() if isinstance(m, fsdp1)]
    with ExitStack() as stack:
        for root in roots:
            stack.enter_context(fsdp1.summon_full_params(root, writeback=False, recurse=True))
        # Each unit's own module runs on the gathered weights (its hooks included) instead of FSDP1's forward.
        previous = [unit.__dict__.get("forward") for unit in units]
        for unit in units:
            unit.forward = unit.module.__call__
        try:
            yield
        finally:
            for unit, forward in zip(units, previous):
                del unit.forward
                if forward is not None:
                    unit.forward = forward


def _reshards_after_forward(unit) -> bool:
    # FSDP2 has a public setter but no getter: a unit reshards after forward iff its parameter group has
    # a post-forward mesh.
    group = unit._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `model`, gathered from every rank; a plain state dict for an
    unsharded model. A collective: every rank must call it. With `cpu_offload` only rank 0 receives the
    tensors (on CPU), the other ranks get an empty dict, so only rank 0 should write the export.

    Under FSDP1 `model` must own all its parameters (the FSDP1 root or a module containing it), as for
    `unsharded_for_generation`; the keys are those of the unwrapped modules.
    """
    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch import distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # FSDP1's offload_to_cpu kills the process (SIGSEGV cloning the gathered tensors, torch 2.13) when the
    # parameters already live on the CPU: there every rank gathers, then only rank 0 keeps the result.
    offload = cpu_offload and not any(root.compute_device.type == "cpu" for root in fsdp1_roots(model))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    if cpu_offload and not offload and dist.get_rank() != 0:
        return {}
    return state
