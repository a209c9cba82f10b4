"""Fused kernels against plain autograd through a full log-softmax (float64 references)."""

from __future__ import annotations

import pytest
import torch

from aesl_lightning.kernels import IGNORE_INDEX, linear_token_stats, token_entropy, token_logprobs, token_stats


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
