"""Fused kernels against plain autograd through a full log-softmax (float64 references)."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aesl_lightning.ops.kernels import IGNORE_INDEX, linear_token_stats, set_cpu_workers, token_entropy, token_logprobs, token_stats


def reference_stats(z: torch.Tensor, targets: torch.Tensor, temperature: float, anchor_logits: torch.Tensor | None):
    """Every statistic with torch ops on the full [rows x V] tensors, rows with target -100 zeroed."""
    valid = targets != IGNORE_INDEX
    logp = torch.log_softmax(z / temperature, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid
    entropy = -(logp.exp() * logp).sum(-1) * valid
    soft = None
    if anchor_logits is not None:
        r = torch.softmax(anchor_logits, dim=-1)
        soft = -(r * logp).sum(-1) * valid
    return picked, entropy, soft


def make(rows=23, vocab=17, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=gen, dtype=dtype) * 3).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[[0, 5, 6, 7, 19]] = IGNORE_INDEX  # masked rows, including a run, so chunks are not contiguous
    base = torch.randn(rows, vocab, generator=gen, dtype=dtype) * 2
    weights = torch.randn(3, rows, generator=gen, dtype=dtype)
    return z, targets, base, weights


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_values_and_gradients_of_every_term_match_autograd(temperature, chunk):
    z, targets, base, (w_logp, w_h, w_x) = make()
    anchor = lambda rows, _z: torch.log_softmax(base.index_select(0, rows), dim=-1)  # noqa: E731
    stats = token_stats(z, targets, temperature=temperature, with_entropy=True, anchor=anchor, chunk_size=chunk)
    ref_logp, ref_h, ref_x = reference_stats(z, targets, temperature, base)
    torch.testing.assert_close(stats.logprob, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.entropy, ref_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.soft_ce, ref_x, rtol=0, atol=1e-12)
    valid = targets != IGNORE_INDEX
    torch.testing.assert_close(stats.anchor_logprob, torch.log_softmax(base, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(1) * valid)

    (grad,) = torch.autograd.grad((w_logp * stats.logprob + w_h * stats.entropy + w_x * stats.soft_ce).sum(), z)
    (ref_grad,) = torch.autograd.grad((w_logp * ref_logp + w_h * ref_h + w_x * ref_x).sum(), z)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    assert grad[~valid].abs().max() == 0


def test_unused_outputs_cost_nothing_and_masked_rows_get_no_gradient():
    z, targets, _, (w, _, _) = make()
    logp, entropy = token_logprobs(z, targets.clamp(min=0), mask=targets != IGNORE_INDEX, return_entropy=True, chunk_size=3)
    assert not entropy.requires_grad
    (grad,) = torch.autograd.grad((w * logp).sum(), z)
    ref_logp, ref_h, _ = reference_stats(z, targets, 1.0, None)
    (ref_grad,) = torch.autograd.grad((w * ref_logp).sum(), z)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_h.detach(), rtol=0, atol=1e-12)


def test_token_logprobs_of_3d_logits_with_temperature_match_log_softmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 50, generator=gen, dtype=torch.float32)
    ids = torch.randint(0, 50, (4, 6), generator=gen)
    logp, _ = token_logprobs(logits, ids, temperature=0.6)
    expected = torch.log_softmax(logits.double() / 0.6, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), expected, rtol=0, atol=2e-6)
    assert logp.dtype == torch.float32


def test_minus_inf_logits_give_finite_entropy_and_gradient():
    z = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 0.5, float("-inf")]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1])
    stats = token_stats(z, targets, with_entropy=True)
    assert torch.isfinite(stats.entropy).all()
    (grad,) = torch.autograd.grad(stats.entropy.sum() + stats.logprob[0], z)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_path_equals_logit_path_values_and_gradients(with_bias):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(19, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 13, (19,), generator=gen)
    targets[[2, 3, 11]] = IGNORE_INDEX
    base = torch.randn(19, 13, generator=gen, dtype=torch.float64)
    anchor = lambda rows, _z: torch.log_softmax(base.index_select(0, rows), dim=-1)  # noqa: E731
    w = torch.randn(3, 19, generator=gen, dtype=torch.float64)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    stats = linear_token_stats(hidden, weight, bias, targets, with_entropy=True, anchor=anchor, chunk_size=4)
    grads = torch.autograd.grad((w[0] * stats.logprob + w[1] * stats.entropy + w[2] * stats.soft_ce).sum(), inputs)
    logits = hidden @ weight.T + (bias if with_bias else 0)
    ref_logp, ref_h, ref_x = reference_stats(logits, targets, 1.0, base)
    ref = torch.autograd.grad((w[0] * ref_logp + w[1] * ref_h + w[2] * ref_x).sum(), inputs)
    torch.testing.assert_close(stats.logprob, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.soft_ce, ref_x, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_token_entropy_reductions():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 9, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=gen) < 0.6
    full = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(token_entropy(logits, mask, reduction="none"), full * mask)
    torch.testing.assert_close(token_entropy(logits, mask, reduction="sum"), (full * mask).sum())
    torch.testing.assert_close(token_entropy(logits, mask, chunk_size=2), (full * mask).sum() / mask.sum())


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match=r"token ids in \[0, 5\)"):
        token_stats(torch.zeros(2, 5), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="integer token ids"):
        token_stats(torch.zeros(2, 5), torch.tensor([0.0, 1.0]))


@pytest.fixture
def cpu_workers():
    """Set the kernels' CPU workers for one test; back to the default afterwards."""
    yield set_cpu_workers
    set_cpu_workers(None)


@pytest.mark.parametrize("workers", [2, 3])
def test_cpu_workers_give_the_serial_values_and_gradients(cpu_workers, workers):
    # 300 rows x 1000: the workers get several pieces, cut at the ignored rows
    z, targets, base, (w_logp, w_h, w_x) = make(rows=300, vocab=1000, seed=3)
    targets[100:140] = IGNORE_INDEX
    threads = set()

    def anchor(rows, _z):
        threads.add(threading.current_thread().name)
        return torch.log_softmax(base.index_select(0, rows), dim=-1)

    results = {}
    for count in (1, workers):
        cpu_workers(count)
        stats = token_stats(z, targets, temperature=0.7, with_entropy=True, anchor=anchor)
        objective = (w_logp * stats.logprob + w_h * stats.entropy + w_x * stats.soft_ce).sum()
        results[count] = (stats, torch.autograd.grad(objective, z)[0], token_entropy(z.detach(), targets != IGNORE_INDEX, reduction="none"))
        if count == 1:
            assert threads == {threading.current_thread().name}
    assert any(name.startswith("aesl-kernel") for name in threads), "the pieces should run on the worker threads"
    (serial, serial_grad, serial_h), (pooled, pooled_grad, pooled_h) = results[1], results[workers]
    for name in ("logprob", "entropy", "soft_ce", "anchor_logprob", "anchor_entropy"):
        torch.testing.assert_close(getattr(pooled, name), getattr(serial, name), rtol=0, atol=1e-12, msg=name)
    assert torch.equal(pooled.correct, serial.correct)
    torch.testing.assert_close(pooled_grad, serial_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled_h, serial_h, rtol=0, atol=1e-12)
    assert pooled_grad[targets == IGNORE_INDEX].abs().max() == 0


def test_cpu_workers_leave_the_callers_thread_count_and_raise_a_pieces_error(cpu_workers):
    cpu_workers(2)
    before = torch.get_num_threads()
    z, targets, base, _ = make(rows=300, vocab=1000, seed=4)
    token_stats(z, targets, with_entropy=True)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before and seen == [before]

    def broken(rows, _z):
        if int(rows[0]) > 150:
            raise RuntimeError("anchor failed")
        return torch.log_softmax(base.index_select(0, rows), dim=-1)

    with pytest.raises(RuntimeError, match="anchor failed"):
        token_stats(z, targets, with_entropy=True, anchor=broken)
    assert token_stats(z, targets).logprob.shape == (300,)  # the workers still serve
    with pytest.raises(ValueError, match="workers must be None or >= 1"):
        cpu_workers(0)


def _logprob_sum_in_child(queue):
    torch.set_num_threads(1)  # as a DataLoader worker does: a forked child cannot use the parent's OpenMP team
    z, targets, _, _ = make(rows=300, vocab=1000, seed=5)
    queue.put(float(token_stats(z.detach(), targets).logprob.sum()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_cpu_workers_serve_a_forked_child(cpu_workers):
    cpu_workers(2)
    z, targets, _, _ = make(rows=300, vocab=1000, seed=5)
    expected = float(token_stats(z.detach(), targets).logprob.sum())  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_logprob_sum_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(expected, abs=1e-9)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_cpu_workers_follow_inference_mode_and_leave_dispatch_modes_in_the_callers_thread(cpu_workers):
    z, targets, _, _ = make(rows=300, vocab=1000, seed=6)
    z = z.detach()
    entropies, calls = {}, {}
    for count in (1, 2):
        cpu_workers(count)
        with torch.inference_mode():  # Lightning validates under it: the workers must write inference tensors
            logits = z.clone()
            entropies[count] = (token_entropy(logits, targets != IGNORE_INDEX, reduction="none"),
                                token_stats(logits, targets, with_entropy=True).entropy)
        with _CountOps() as counter:  # a dispatch mode is thread-local: every op must still pass through it
            token_stats(z, targets, with_entropy=True)
        calls[count] = counter.calls
    for serial, pooled in zip(entropies[1], entropies[2]):
        torch.testing.assert_close(pooled, serial, rtol=0, atol=1e-12)
    assert calls[2] == calls[1] > 0
