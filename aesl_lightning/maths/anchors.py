"""The anchor distribution r of a loss's soft cross-entropy X_t = -sum_v r_v log p_theta(v), as a kernel `Anchor`.

A loss registered with anchor="base" is anchored to the frozen base model: r = p0, recomputed chunk by chunk from
the base's final hidden states and LM head (`BaseStates`), so no [tokens x vocab] copy of the base's logits exists.
One registered with anchor="self" (gem) is anchored to the model's own sharpened softmax(z / beta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aesl_lightning.maths.loss_config import LossConfig
from aesl_lightning.ops.kernels import Anchor

__all__ = ["BaseStates", "loss_anchor"]


@dataclass
class BaseStates:
    """The frozen base model's final hidden states [B, T, H] (no gradient) and LM head, for anchor="base" losses.

    The base's logits are recomputed chunk by chunk from these, so no [tokens x vocab] copy of them exists.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


def loss_anchor(config: LossConfig, base: BaseStates | None, *, rows: Tensor | None, grid: tuple[int, int], vocab: int) -> Anchor | None:
    """The kernel's anchor callable for `config`'s loss (None for a loss without X_t).

    `grid` is the [B, T] of the loss's inputs; `rows` the flat [B * T] rows the kernel runs on (None: all of them).
    """
    kind = config.spec.anchor
    if kind == "self":
        beta = config.gem_beta
        return lambda _rows, z: torch.log_softmax(z / beta, dim=-1)
    if kind != "base":
        return None
    if base is None:
        raise ValueError(f"loss {config.name!r} is anchored to the base model: pass base=BaseStates(hidden, lm_head_weight)")
    if base.hidden.shape[:2] != grid or base.weight.shape[0] != vocab:
        raise ValueError(f"base states must be hidden [{grid[0]}, {grid[1]}, H] with a [{vocab}, H] head, found "
                         f"{list(base.hidden.shape)} and {list(base.weight.shape)}")
    flat = base.hidden.detach().reshape(grid[0] * grid[1], -1)
    if rows is not None:
        flat = flat.index_select(0, rows)
    weight = base.weight.detach()
    bias = None if base.bias is None else base.bias.detach()

    def base_log_probs(chunk_rows: Tensor, z: Tensor) -> Tensor:
        h = flat.index_select(0, chunk_rows)
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        return torch.log_softmax(logits.to(z.dtype), dim=-1)

    return base_log_probs
