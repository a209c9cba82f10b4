"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for Hugging Face causal LMs under Lightning's
`ModelParallelStrategy`: sharding per decoder layer, generation with gathered weights, full state dicts.

    Trainer(accelerator="cpu", devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))

shards over gloo on CPU (NCCL on GPUs). Each decoder layer becomes one FSDP unit, then the root holds
the rest (embeddings, final norm, LM head, tied or not): its parameters are all-gathered just before the
unit runs and freed after, so at most one layer's full weights exist at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _fsdp_module_class():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether any submodule of `model` (or the model itself) is an FSDP2 unit."""
    fsdp_module = _fsdp_module_class()
    return any(isinstance(m, fsdp_module) for m in model.modules())


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


def shard_model(model: nn.Module, mesh, **fsdp_kwargs) -> nn.Module:
    """`fully_shard` every decoder layer, then the root, over `mesh` (a 1-D data-parallel DeviceMesh); in place.

    Idempotent: an already sharded model is returned unchanged (Lightning calls `configure_model` for every
    stage). `fsdp_kwargs` go to `fully_shard` (e.g. `mp_policy`, `reshard_after_forward`).
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


@contextmanager
def unsharded_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every FSDP unit of `model` holds its full parameters, so `generate` runs without
    collectives; each unit reshards on exit. A no-op for a model that is not sharded.

    All units, not only the root: with only the root unsharded, every layer still all-gathers its weights at
    every generated token, and ranks that stop at different lengths (EOS) then wait on each other forever.
    The gathered weights are all held at once, so the whole model must fit in memory on each rank while
    generating (the usual trade-off for fast rollouts). Every rank must enter the block (unshard is a
    collective); what happens inside may differ per rank.
    """
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


def _reshards_after_forward(unit) -> bool:
    # FSDP2 has a public setter but no getter: a unit reshards after forward iff its parameter group has
    # a post-forward mesh.
    group = unit._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `model`, gathered from every rank; a plain state dict for an
    unsharded model. A collective: every rank must call it. With `cpu_offload` only rank 0 receives the
    tensors (on CPU), the other ranks get an empty dict, so only rank 0 should write the export."""
    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
