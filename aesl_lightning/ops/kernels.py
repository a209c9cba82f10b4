"""Fused per-token kernels over [rows x vocab] logits, used by the SFT losses, the metrics and GRPO.

For a row of logits z (vocabulary V), a temperature T, the softmax p = softmax(z / T), a target y and an
optional detached *anchor* distribution r (the base model's, or a sharpened copy of the model's own), the
kernels compute per row

    log p_y                          (the target's log-probability)
    H = -sum_v p_v log p_v           (predictive entropy, nats)
    X = -sum_v r_v log p_v           (soft cross-entropy against r; KL(r || p) = X - H(r))

and the gradients of any weighted sum of them (z' = z / T, so each carries a factor 1 / T):

    d log p_y / dz' = onehot(y) - p        d H / dz' = -p (log p + H)        d X / dz' = p - r

Nothing of size [rows x V] is kept for the backward pass beyond the logits the caller already holds: the
softmax is recomputed chunk by chunk, and the gradient is written into one [rows x V] buffer. The linear
variant never builds the logits at all: it recomputes `hidden @ weight.T + bias` per chunk in both passes
(the idea of Liger-Kernel's fused linear cross-entropy; an independent implementation).

Chunks are sized by a memory budget (`DEFAULT_CHUNK_ELEMS` float32 elements), not by a CPU cache: a loop of
tiny kernels is slow on a GPU (launches). On a CPU the chunks run concurrently on `torch.get_num_threads()`
single-threaded workers (`set_cpu_workers`), each taking the next chunk when done: torch's own ops split evenly
across their threads and wait for the slowest, so beside another busy process a loop of them runs at the speed of
the shared core. (The linear variant, mostly matrix products, runs its chunks in order.)

This module is the checked public interface; the autograd Functions and their chunk maths are in
`aesl_lightning.ops.kernel_autograd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from aesl_lightning.ops.kernel_autograd import (IGNORE_INDEX, Anchor, LinearStats, LogitStats, acc_dtype, for_each_chunk, row_entropy,
                                           set_cpu_workers, take_rows)

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "IGNORE_INDEX",
    "Anchor",
    "TokenStats",
    "linear_token_stats",
    "masked_rows",
    "row_chunk",
    "set_cpu_workers",
    "token_entropy",
    "token_logprobs",
    "token_stats",
]

DEFAULT_CHUNK_ELEMS = 1 << 24
"""Float32 elements per chunk (64 MiB): few enough chunks that a loaded CPU or a GPU is not slowed by many small
kernels, and far below one [rows x V] copy at training sizes."""


@dataclass
class TokenStats:
    """Per-row results of a kernel call, each shaped like the targets (0 where the target is ignored).

    `logprob`, `entropy` and `soft_ce` are differentiable (when computed); the rest are detached.
    """

    logprob: Tensor
    entropy: Tensor | None = None
    soft_ce: Tensor | None = None
    correct: Tensor | None = None
    anchor_logprob: Tensor | None = None
    anchor_entropy: Tensor | None = None


def row_chunk(vocab: int, budget: int | None = None) -> int:
    """Rows per chunk of a [rows x vocab] computation: `budget` (default `DEFAULT_CHUNK_ELEMS`) elements."""
    return max(1, (budget or DEFAULT_CHUNK_ELEMS) // max(1, vocab))


@torch.no_grad()
def masked_rows(logits: Tensor, mask: Tensor | None, caller: str) -> Tensor:
    """Indices of the rows of `logits.reshape(-1, V)` that `mask` (shape `logits.shape[:-1]`) selects; all
    rows when `mask` is None. The error names `caller`."""
    if mask is None:
        return torch.arange(logits.shape[:-1].numel(), device=logits.device)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"{caller}: mask must have shape {list(logits.shape[:-1])} (logits without the vocab axis), found {list(mask.shape)}")
    return mask.reshape(-1).nonzero().squeeze(1)


def token_stats(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    anchor: Anchor | None = None,
    chunk_size: int | None = None,
) -> TokenStats:
    """log p_y, and optionally H, X (against `anchor`) and argmax accuracy, for `logits [..., V]`, `targets [...]`.

    Targets equal to -100 are skipped (every output 0 there, zero gradient). Outputs are float32 (float64 for
    float64 logits). `correct` is computed together with the entropy.
    """
    vocab = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_stats: targets must have shape {list(logits.shape[:-1])}, found {list(targets.shape)}")
    _check_targets(targets, vocab, "token_stats")
    chunk = chunk_size or row_chunk(vocab)
    outs = LogitStats.apply(logits.reshape(-1, vocab), targets.reshape(-1), chunk, float(temperature), with_entropy, anchor)
    return _shape(outs, targets.shape, with_entropy, anchor is not None)


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(log softmax(logits / T)[token], entropy or None) for `logits [..., V]` and `token_ids [...]`.

    The log-probs of the distribution the tokens were sampled from (GRPO); positions where `mask` is False get
    0 and no gradient. The entropy (of softmax(logits / T)) is detached. No [..., V] float32 copy is kept.
    """
    targets = token_ids if mask is None else token_ids.masked_fill(~mask.bool(), IGNORE_INDEX)
    stats = token_stats(logits, targets, temperature=temperature if temperature > 0 else 1.0,
                        with_entropy=return_entropy, chunk_size=chunk_size)
    return stats.logprob, (stats.entropy.detach() if return_entropy else None)


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    with_entropy: bool = False,
    anchor: Anchor | None = None,
    chunk_size: int | None = None,
) -> TokenStats:
    """`token_stats(hidden @ weight.T + bias, targets)` for hidden rows [M, H], never holding [M x V] logits.

    Differentiable with respect to `hidden`, `weight` and `bias`; rows whose target is -100 are skipped.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_token_stats: hidden [M, H] and weight [V, H] expected, found {list(hidden.shape)} and {list(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_token_stats: targets must be [{hidden.shape[0]}], found {list(targets.shape)}")
    _check_targets(targets, weight.shape[0], "linear_token_stats")
    chunk = chunk_size or row_chunk(weight.shape[0])
    outs = LinearStats.apply(hidden, weight, bias, targets, chunk, with_entropy, anchor)
    return _shape(outs, targets.shape, with_entropy, anchor is not None)


@torch.no_grad()
def token_entropy(
    logits: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Entropy H = -sum_v p(v) log p(v), in nats, of the distributions in `logits [..., V]`; no gradient.

    No shifting: `mask [...]` selects the rows that count (None: all). reduction "mean" averages over the
    selected rows (0 when none), "sum" adds them up (pair it with `mask.sum()` for distributed averaging),
    "none" returns [...] with 0 on unselected rows.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = masked_rows(logits, mask, "token_entropy")
    acc = acc_dtype(logits.dtype)
    entropy = torch.zeros(flat.shape[0], dtype=acc, device=logits.device)

    def chunk_entropy(chunk_rows: Tensor) -> None:
        entropy.index_copy_(0, chunk_rows, row_entropy(torch.log_softmax(take_rows(flat, chunk_rows).to(acc), dim=-1)))

    for_each_chunk(rows, chunk_size or row_chunk(logits.shape[-1]), logits.shape[-1], chunk_entropy)
    if reduction == "none":
        return entropy.view(logits.shape[:-1])
    if reduction == "sum":
        return entropy.sum()
    if reduction == "mean":
        return entropy.sum() / max(rows.numel(), 1)
    raise ValueError(f"token_entropy: reduction must be 'mean', 'sum' or 'none', found {reduction!r}")


def _check_targets(targets: Tensor, vocab: int, caller: str) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{caller}: targets must be integer token ids, found dtype {targets.dtype}")
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(f"{caller}: targets must be -100 or token ids in [0, {vocab}), found values in [{int(valid.min())}, {int(valid.max())}]")


def _shape(outs, shape, with_entropy: bool, with_anchor: bool) -> TokenStats:
    logp, entropy, soft_ce, correct, anchor_logp, anchor_entropy = outs
    view = lambda t: t.view(shape)  # noqa: E731
    return TokenStats(
        logprob=view(logp),
        entropy=view(entropy) if with_entropy else None,
        soft_ce=view(soft_ce) if with_anchor else None,
        correct=view(correct) if with_entropy else None,
        anchor_logprob=view(anchor_logp) if with_anchor else None,
        anchor_entropy=view(anchor_entropy) if with_anchor else None,
    )
