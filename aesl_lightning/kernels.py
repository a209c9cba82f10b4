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
tiny kernels is slow on a GPU (launches) and on a shared CPU (every op waits for its OpenMP team).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "IGNORE_INDEX",
    "Anchor",
    "TokenStats",
    "linear_token_stats",
    "masked_rows",
    "row_chunk",
    "token_entropy",
    "token_logprobs",
    "token_stats",
]

IGNORE_INDEX = -100
DEFAULT_CHUNK_ELEMS = 1 << 24
"""Float32 elements per chunk (64 MiB): few enough chunks that a loaded CPU or a GPU is not slowed by many small
kernels, and far below one [rows x V] copy at training sizes."""

Anchor = Callable[[Tensor, Tensor], Tensor]
"""`anchor(rows, scaled_logits_chunk) -> log r [chunk, V]`, computed without gradient. `rows` are the flat row
indices of the chunk, `scaled_logits_chunk` is z / T of those rows (float32 or float64)."""


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
    outs = _LogitStats.apply(logits.reshape(-1, vocab), targets.reshape(-1), chunk, float(temperature), with_entropy, anchor)
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
    outs = _LinearStats.apply(hidden, weight, bias, targets, chunk, with_entropy, anchor)
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
    acc = _acc_dtype(logits.dtype)
    entropy = torch.zeros(flat.shape[0], dtype=acc, device=logits.device)
    for chunk_rows in rows.split(chunk_size or row_chunk(logits.shape[-1])):
        entropy.index_copy_(0, chunk_rows, _entropy(torch.log_softmax(_take(flat, chunk_rows).to(acc), dim=-1)))
    if reduction == "none":
        return entropy.view(logits.shape[:-1])
    if reduction == "sum":
        return entropy.sum()
    if reduction == "mean":
        return entropy.sum() / max(rows.numel(), 1)
    raise ValueError(f"token_entropy: reduction must be 'mean', 'sum' or 'none', found {reduction!r}")


# ----------------------------------------------------------------------------------------------------------
# Chunk maths shared by both autograd functions
# ----------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _entropy(logprob: Tensor) -> Tensor:
    """Row entropies of a [rows, V] log-probability chunk; 0 * log 0 counts as 0 (for -inf logits)."""
    return logprob.exp().mul_(logprob).nan_to_num_(0.0).sum(dim=-1).neg_()


def _take(values: Tensor, rows: Tensor) -> Tensor:
    """values[rows] as a view when the rows are one contiguous run (the common case), else a gathered copy."""
    count = rows.numel()
    if count and int(rows[-1]) - int(rows[0]) == count - 1:
        return values.narrow(0, int(rows[0]), count)
    return values.index_select(0, rows)


def _chunks(rows: Tensor, size: int) -> list[Tensor]:
    """`rows` (sorted indices) in pieces of at most `size`, cut where a run of consecutive indices ends, so that each
    piece is a view of the logits and its gradient is written in place (sequence ends and prompts leave holes)."""
    if rows.numel() == 0:
        return []
    breaks = ((rows[1:] - rows[:-1]) != 1).nonzero().squeeze(1) + 1
    pieces = []
    for run in rows.tensor_split(breaks.cpu()):
        pieces.extend(run.split(size))
    return pieces


def _put(out: Tensor, rows: Tensor, values: Tensor) -> None:
    count = rows.numel()
    if count and int(rows[-1]) - int(rows[0]) == count - 1:
        out.narrow(0, int(rows[0]), count).copy_(values)
    else:
        out.index_copy_(0, rows, values.to(out.dtype))


def _scaled(logits_chunk: Tensor, temperature: float) -> Tensor:
    acc = _acc_dtype(logits_chunk.dtype)
    z = logits_chunk.to(acc)
    return z * (1.0 / temperature) if temperature != 1.0 else z


def _chunk_forward(z: Tensor, targets: Tensor, rows: Tensor, with_entropy: bool, anchor: Anchor | None) -> list[Tensor | None]:
    """[log p_y, H, X, correct, log r_y, H(r), logsumexp z] of one chunk of scaled logits z (None where not asked)."""
    entropy = correct = soft_ce = anchor_logp = anchor_entropy = None
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    if not with_entropy and anchor is None:
        # log p_y = z_y - logsumexp(z): one pass over the chunk, no [chunk x V] temporary
        lse = torch.logsumexp(z, dim=-1)
        return [z_target - lse, None, None, None, None, None, lse]
    logp = torch.log_softmax(z, dim=-1)
    picked = logp.gather(1, targets[:, None]).squeeze(1)
    if with_entropy:
        entropy = _entropy(logp)
        correct = logp.argmax(dim=-1) == targets
    if anchor is not None:
        log_r = anchor(rows, z)
        r = log_r.exp()
        soft_ce = torch.where(r > 0, r * logp, 0.0).sum(dim=-1).neg_()
        anchor_logp = log_r.gather(1, targets[:, None]).squeeze(1)
        anchor_entropy = _entropy(log_r)
    return [picked, entropy, soft_ce, correct, anchor_logp, anchor_entropy, z_target - picked]


def _chunk_grad(
    z: Tensor, targets: Tensor, rows: Tensor, temperature: float, lse: Tensor,
    g_logp: Tensor | None, g_entropy: Tensor | None, entropy: Tensor | None, g_soft: Tensor | None, anchor: Anchor | None,
    out: Tensor | None = None,
) -> Tensor:
    """d(sum_rows g_logp log p_y + g_entropy H + g_soft X) / d logits for one chunk (z = logits / T, lse its logsumexp).

    Written into `out` when given (same shape and dtype as z), else into a new tensor.
    """
    coeff = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    if g_logp is not None:
        coeff -= g_logp
    if g_soft is not None:
        coeff += g_soft
    p = torch.sub(z, lse[:, None], out=out) if out is not None else z - lse[:, None]
    if g_entropy is not None:
        # -g_H * p * (log p + H) + coeff * p = p * (coeff - g_H (log p + H)); p = 0 rows of -inf logits give 0
        term = (p + entropy[:, None]).mul_(-g_entropy[:, None]).add_(coeff[:, None])
        grad = p.exp_().mul_(term).nan_to_num_(0.0, 0.0, 0.0)
    else:
        grad = p.exp_().mul_(coeff[:, None])
    if g_logp is not None:
        grad.scatter_add_(1, targets[:, None], g_logp[:, None])
    if g_soft is not None:
        grad.sub_(anchor(rows, z).exp_().mul_(g_soft[:, None]))
    return grad.mul_(1.0 / temperature) if temperature != 1.0 else grad


def _forward_loop(num_rows, targets, rows_per_chunk, with_entropy, anchor, dtype, device, chunk_logits):
    outs = [torch.zeros(num_rows, dtype=dtype, device=device)]
    outs.append(torch.zeros(num_rows if with_entropy else 0, dtype=dtype, device=device))
    outs.append(torch.zeros(num_rows if anchor is not None else 0, dtype=dtype, device=device))
    outs.append(torch.zeros(num_rows if with_entropy else 0, dtype=torch.bool, device=device))
    outs.append(torch.zeros(num_rows if anchor is not None else 0, dtype=dtype, device=device))
    outs.append(torch.zeros(num_rows if anchor is not None else 0, dtype=dtype, device=device))
    outs.append(torch.zeros(num_rows, dtype=dtype, device=device))  # logsumexp, kept for the backward pass
    for rows in _chunks((targets != IGNORE_INDEX).nonzero().squeeze(1), rows_per_chunk):
        chunk_targets = _take(targets, rows)
        for out, value in zip(outs, _chunk_forward(chunk_logits(rows), chunk_targets, rows, with_entropy, anchor)):
            if value is not None:
                _put(out, rows, value)
    return outs


def _active_rows(targets: Tensor, *grads: Tensor | None) -> Tensor:
    active = torch.zeros_like(targets, dtype=torch.bool)
    for grad in grads:
        if grad is not None:
            active |= grad != 0
    return (active & (targets != IGNORE_INDEX)).nonzero().squeeze(1)


def _grad_slices(grad: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if grad is None else _take(grad, rows)


class _LogitStats(torch.autograd.Function):
    """Per-row statistics of [N, V] logits; see the module docstring. Saves only the logits and [N] vectors."""

    @staticmethod
    def forward(ctx, logits, targets, rows_per_chunk, temperature, with_entropy, anchor):
        acc = _acc_dtype(logits.dtype)
        outs = _forward_loop(logits.shape[0], targets, rows_per_chunk, with_entropy, anchor, acc, logits.device,
                             lambda rows: _scaled(_take(logits, rows), temperature))
        lse = outs.pop()
        ctx.save_for_backward(logits, targets, outs[1], lse)
        ctx.rows_per_chunk, ctx.temperature, ctx.anchor = rows_per_chunk, temperature, anchor
        ctx.mark_non_differentiable(outs[3], outs[4], outs[5])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy, g_soft, *_):
        logits, targets, entropy, lse = ctx.saved_tensors
        active = _active_rows(targets, g_logp, g_entropy, g_soft)
        grad_logits = torch.empty_like(logits)
        idle = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        idle[active] = False
        grad_logits.index_fill_(0, idle.nonzero().squeeze(1), 0)
        direct = logits.dtype == _acc_dtype(logits.dtype)  # float32 / float64: write the chunk's gradient in place
        for rows in _chunks(active, ctx.rows_per_chunk):
            z = _scaled(_take(logits, rows), ctx.temperature)
            contiguous = int(rows[-1]) - int(rows[0]) == rows.numel() - 1
            out = grad_logits.narrow(0, int(rows[0]), rows.numel()) if direct and contiguous else None
            grad = _chunk_grad(z, _take(targets, rows), rows, ctx.temperature, _take(lse, rows), _grad_slices(g_logp, rows),
                               _grad_slices(g_entropy, rows), _grad_slices(entropy, rows) if g_entropy is not None else None,
                               _grad_slices(g_soft, rows), ctx.anchor, out=out)
            if out is None:
                _put(grad_logits, rows, grad.to(logits.dtype))
        return grad_logits, None, None, None, None, None


class _LinearStats(torch.autograd.Function):
    """Per-row statistics of hidden @ weight.T + bias for [M, H] hidden rows, logits recomputed per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk, with_entropy, anchor):
        acc = _acc_dtype(hidden.dtype)
        outs = _forward_loop(hidden.shape[0], targets, rows_per_chunk, with_entropy, anchor, acc, hidden.device,
                             lambda rows: _project(_take(hidden, rows), weight, bias).to(acc))
        lse = outs.pop()
        ctx.save_for_backward(hidden, weight, bias, targets, outs[1], lse)
        ctx.rows_per_chunk, ctx.anchor = rows_per_chunk, anchor
        ctx.mark_non_differentiable(outs[3], outs[4], outs[5])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy, g_soft, *_):
        hidden, weight, bias, targets, entropy, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = _acc_dtype(hidden.dtype)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        for rows in _chunks(_active_rows(targets, g_logp, g_entropy, g_soft), ctx.rows_per_chunk):
            chunk_hidden = _take(hidden, rows)
            z = _project(chunk_hidden, weight, bias).to(acc)
            grad = _chunk_grad(z, _take(targets, rows), rows, 1.0, _take(lse, rows), _grad_slices(g_logp, rows), _grad_slices(g_entropy, rows),
                               _grad_slices(entropy, rows) if g_entropy is not None else None, _grad_slices(g_soft, rows), ctx.anchor)
            if need_bias:
                grad_bias += grad.sum(dim=0)
            grad = grad.to(hidden.dtype)
            if need_hidden:
                _put(grad_hidden, rows, grad @ weight)
            if need_weight:
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad.t(), chunk_hidden)
                else:
                    grad_weight += grad.t() @ chunk_hidden
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None, None)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


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
