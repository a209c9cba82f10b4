"""The autograd Functions behind `aesl_lightning.ops.kernels`, and the chunk maths both share.

`LogitStats` works on [N, V] logits it is given; `LinearStats` on [M, H] hidden rows and an LM head, recomputing
`hidden @ weight.T + bias` chunk by chunk in both passes. Both compute, per row and chunk by chunk, log p_y, H, X
against an anchor and argmax accuracy (`_chunk_forward`) and write the gradient of any weighted sum of log p_y, H
and X (`_chunk_grad`); the equations are in the `kernels` docstring. Call them through `kernels`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["IGNORE_INDEX", "Anchor", "LinearStats", "LogitStats", "acc_dtype", "for_each_chunk", "row_entropy", "set_cpu_workers", "take_rows"]

IGNORE_INDEX = -100

Anchor = Callable[[Tensor, Tensor], Tensor]
"""`anchor(rows, scaled_logits_chunk) -> log r [chunk, V]`, computed without gradient. `rows` are the flat row
indices of the chunk, `scaled_logits_chunk` is z / T of those rows (float32 or float64). On a CPU it is called from
several threads at once, one chunk each: it must not change shared state."""


# ----------------------------------------------------------------------------------------------------------
# Chunk maths shared by both autograd Functions
# ----------------------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_entropy(logprob: Tensor) -> Tensor:
    """Row entropies of a [rows, V] log-probability chunk; 0 * log 0 counts as 0 (for -inf logits)."""
    return logprob.exp().mul_(logprob).nan_to_num_(0.0).sum(dim=-1).neg_()


def take_rows(values: Tensor, rows: Tensor) -> Tensor:
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


# ----------------------------------------------------------------------------------------------------------
# Running the chunks: in order on an accelerator, on a pool of single-threaded workers on a CPU
# ----------------------------------------------------------------------------------------------------------
# torch splits each CPU op evenly across its OpenMP team and waits for the slowest member. When another process
# takes a core, the member sharing it runs at half speed for the whole op, so a loop of ops each a few ms long
# runs at the speed of the slowest core. Workers that each run whole chunks single-threaded and take the next
# chunk when done share the work by speed instead (measured in benchmarks/RESULTS.md).

MIN_PIECE_ELEMS = 1 << 16
"""Elements below which a chunk is not cut further for the CPU workers (a task costs tens of microseconds)."""

_cpu_workers: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_in_worker = threading.local()


def set_cpu_workers(workers: int | None) -> None:
    """Threads that run the kernels' chunks on a CPU: None (default) uses `torch.get_num_threads()`, 1 runs the
    chunks one after another with torch's own intra-op threads."""
    global _cpu_workers
    if workers is not None and workers < 1:
        raise ValueError(f"set_cpu_workers: workers must be None or >= 1, found {workers}")
    _cpu_workers = workers


def _workers(device: torch.device) -> int:
    if device.type != "cpu" or getattr(_in_worker, "active", False) or _traced():
        return 1
    return _cpu_workers or torch.get_num_threads()


def _traced() -> bool:
    """Under torch.compile or a Python dispatch / function mode (FakeTensorMode, FlopCounterMode, ...), which are
    thread-local and would not follow the work onto the workers."""
    return is_in_torch_dispatch_mode() or torch._C._len_torch_function_stack() > 0 or torch.compiler.is_compiling()


def _start_worker() -> None:
    _in_worker.active = True
    torch.set_num_threads(1)  # this thread's OpenMP team; the process default is restored by `_worker_pool`


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            threads = torch.get_num_threads()
            started = threading.Barrier(workers + 1)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="aesl-kernel", initializer=_start_worker)
            for _ in range(workers):
                _pool.submit(started.wait)
            started.wait()  # every worker has set its own thread count ...
            torch.set_num_threads(threads)  # ... so the default for threads started later is the caller's again
            _pool_size = workers
        return _pool


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def for_each_chunk(rows: Tensor, size: int, row_elems: int, fn: Callable[[Tensor], None], *, parallel: bool = True) -> None:
    """`fn(piece)` for the pieces of `rows` (see `_chunks`) of at most `size` rows of `row_elems` elements each. On a
    CPU with several workers the pieces are cut smaller (the workers' pieces together within `size`, 4 per worker at
    least) and run concurrently, each under no_grad and the caller's inference mode and CPU autocast; `fn` must only
    write rows of its own piece. `parallel=False` keeps the pieces of `_chunks(rows, size)` in order."""
    workers = _workers(rows.device) if parallel else 1
    if workers > 1:  # the budget shared by the pieces in flight; 4 pieces per worker at least, none under MIN_PIECE_ELEMS
        size = min(max(1, size // workers), max(-(-rows.numel() // (4 * workers)), -(-MIN_PIECE_ELEMS // max(1, row_elems))))
    pieces = _chunks(rows, max(1, size))
    if workers == 1 or len(pieces) == 1:
        for piece in pieces:
            fn(piece)
        return
    inference = torch.is_inference_mode_enabled()
    autocast, autocast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def run(piece: Tensor) -> None:  # the caller's thread-local modes, which a worker thread does not inherit
        with torch.inference_mode(inference), torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            fn(piece)

    pool = _worker_pool(workers)
    futures = [pool.submit(run, piece) for piece in pieces]
    wait(futures)
    for future in futures:
        future.result()  # the first error, after every piece has stopped writing


def _put(out: Tensor, rows: Tensor, values: Tensor) -> None:
    count = rows.numel()
    if count and int(rows[-1]) - int(rows[0]) == count - 1:
        out.narrow(0, int(rows[0]), count).copy_(values)
    else:
        out.index_copy_(0, rows, values.to(out.dtype))


def _scaled(logits_chunk: Tensor, temperature: float) -> Tensor:
    acc = acc_dtype(logits_chunk.dtype)
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
        entropy = row_entropy(logp)
        correct = logp.argmax(dim=-1) == targets
    if anchor is not None:
        log_r = anchor(rows, z)
        r = log_r.exp()
        soft_ce = torch.where(r > 0, r * logp, 0.0).sum(dim=-1).neg_()
        anchor_logp = log_r.gather(1, targets[:, None]).squeeze(1)
        anchor_entropy = row_entropy(log_r)
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


def _save_autocast(ctx, device: torch.device) -> None:
    """Keep the forward's autocast state (CPU and `device`'s type) for `_forward_autocast`."""
    kinds = {"cpu", device.type}
    ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                    for kind in sorted(kinds) if torch.amp.is_autocast_available(kind)]


def _forward_autocast(ctx) -> ExitStack:
    """The forward's autocast state, entered for the backward pass.

    The backward recomputes the logits (LinearStats) and the anchor (a base model's logits) and combines them with
    the forward's logsumexp: computed under another autocast state (Lightning's `bf16-mixed` autocasts only around
    training_step, so the backward runs outside it) they differ from the forward's, the recomputed softmax no longer
    sums to 1 and the gradient is wrong. This is what `torch.amp.custom_bwd` does, for whichever device type the
    tensors are on.
    """
    stack = ExitStack()
    for kind, enabled, dtype in ctx.autocast:
        stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
    return stack


def _fused_forward(ctx, saved: tuple, targets: Tensor, *, vocab: int, parallel: bool, rows_per_chunk: int, with_entropy: bool,
                   anchor: Anchor | None, dtype: torch.dtype, chunk_logits: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
    """The forward pass of both Functions over the chunks of `chunk_logits(rows)` (scaled logits in `dtype`).

    Returns (log p_y, H, X, correct, log r_y, H(r)), each [N] or empty when not asked for; saves `saved`, the
    targets, H and the logsumexp for the backward pass.
    """
    n, device = targets.shape[0], targets.device
    _save_autocast(ctx, device)
    entropy_rows, anchor_rows = (n if with_entropy else 0), (n if anchor is not None else 0)
    # log p_y, H, X, correct, log r_y, H(r), and the logsumexp kept for the backward pass
    sizes = (n, entropy_rows, anchor_rows, entropy_rows, anchor_rows, anchor_rows, n)
    outs = [torch.zeros(size, dtype=torch.bool if i == 3 else dtype, device=device) for i, size in enumerate(sizes)]

    def forward_chunk(rows: Tensor) -> None:
        for out, value in zip(outs, _chunk_forward(chunk_logits(rows), take_rows(targets, rows), rows, with_entropy, anchor)):
            if value is not None:
                _put(out, rows, value)

    for_each_chunk((targets != IGNORE_INDEX).nonzero().squeeze(1), rows_per_chunk, vocab, forward_chunk, parallel=parallel)
    lse = outs.pop()
    ctx.save_for_backward(*saved, targets, outs[1], lse)
    ctx.rows_per_chunk, ctx.anchor = rows_per_chunk, anchor
    ctx.mark_non_differentiable(outs[3], outs[4], outs[5])
    ctx.set_materialize_grads(False)
    return tuple(outs)


def _active_rows(targets: Tensor, *grads: Tensor | None) -> Tensor:
    active = torch.zeros_like(targets, dtype=torch.bool)
    for grad in grads:
        if grad is not None:
            active |= grad != 0
    return (active & (targets != IGNORE_INDEX)).nonzero().squeeze(1)


def _grad_slices(grad: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if grad is None else take_rows(grad, rows)


class LogitStats(torch.autograd.Function):
    """Per-row statistics of [N, V] logits; see the module docstring. Saves only the logits and [N] vectors."""

    @staticmethod
    def forward(ctx, logits, targets, rows_per_chunk, temperature, with_entropy, anchor):
        ctx.temperature = temperature
        return _fused_forward(ctx, (logits,), targets, vocab=logits.shape[1], parallel=True, rows_per_chunk=rows_per_chunk,
                              with_entropy=with_entropy, anchor=anchor, dtype=acc_dtype(logits.dtype),
                              chunk_logits=lambda rows: _scaled(take_rows(logits, rows), temperature))

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy, g_soft, *_):
        logits, targets, entropy, lse = ctx.saved_tensors
        active = _active_rows(targets, g_logp, g_entropy, g_soft)
        grad_logits = torch.empty_like(logits)
        idle = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        idle[active] = False
        grad_logits.index_fill_(0, idle.nonzero().squeeze(1), 0)
        direct = logits.dtype == acc_dtype(logits.dtype)  # float32 / float64: write the chunk's gradient in place

        def backward_chunk(rows: Tensor) -> None:
            z = _scaled(take_rows(logits, rows), ctx.temperature)
            contiguous = int(rows[-1]) - int(rows[0]) == rows.numel() - 1
            out = grad_logits.narrow(0, int(rows[0]), rows.numel()) if direct and contiguous else None
            grad = _chunk_grad(z, take_rows(targets, rows), rows, ctx.temperature, take_rows(lse, rows), _grad_slices(g_logp, rows),
                               _grad_slices(g_entropy, rows), _grad_slices(entropy, rows) if g_entropy is not None else None,
                               _grad_slices(g_soft, rows), ctx.anchor, out=out)
            if out is None:
                _put(grad_logits, rows, grad.to(logits.dtype))

        with _forward_autocast(ctx):  # the anchor recomputes the base's logits as the forward did
            for_each_chunk(active, ctx.rows_per_chunk, logits.shape[1], backward_chunk)
        return grad_logits, None, None, None, None, None


class LinearStats(torch.autograd.Function):
    """Per-row statistics of hidden @ weight.T + bias for [M, H] hidden rows, logits recomputed per chunk.

    Its chunks run in order in both passes: they are mostly matrix products, which torch runs on all threads in long
    calls, and both passes recompute the logits of the same chunks (the same rounding)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk, with_entropy, anchor):
        acc = acc_dtype(hidden.dtype)
        return _fused_forward(ctx, (hidden, weight, bias), targets, vocab=weight.shape[0], parallel=False,
                              rows_per_chunk=rows_per_chunk, with_entropy=with_entropy, anchor=anchor, dtype=acc,
                              chunk_logits=lambda rows: _project(take_rows(hidden, rows), weight, bias).to(acc))

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy, g_soft, *_):
        hidden, weight, bias, targets, entropy, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = acc_dtype(hidden.dtype)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        with _forward_autocast(ctx):  # the same logits as the forward's (bf16 under bf16 autocast), the same lse
            for rows in _chunks(_active_rows(targets, g_logp, g_entropy, g_soft), ctx.rows_per_chunk):
                chunk_hidden = take_rows(hidden, rows)
                z = _project(chunk_hidden, weight, bias).to(acc)
                grad = _chunk_grad(z, take_rows(targets, rows), rows, 1.0, take_rows(lse, rows), _grad_slices(g_logp, rows),
                                   _grad_slices(g_entropy, rows), _grad_slices(entropy, rows) if g_entropy is not None else None,
                                   _grad_slices(g_soft, rows), ctx.anchor)
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
