"""bf16 mixed precision: the fused kernels' gradients under CPU bf16 autocast, and bf16-mixed SFT / GRPO fits.

Lightning's `bf16-mixed` autocasts only around training_step: the forward runs under autocast, the backward
outside it. The references here take the logits the autocast forward produced (a bf16 matmul), then compute
the loss in float64 with plain autograd: the exact gradient of the loss the forward computed.
"""

from __future__ import annotations

import pytest
import torch

from aesl_lightning.anchors import BaseStates, loss_anchor
from aesl_lightning.kernels import IGNORE_INDEX, linear_token_stats, token_stats
from aesl_lightning.losses import LossConfig, chunked_sft_loss, sft_loss

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _case(rows=16, width=64, vocab=100, seed=0):
    """The audit's 16 x 64 x 100 case: hidden rows, an LM head with bias, targets (two ignored), loss weights."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.3
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[[3, 9]] = IGNORE_INDEX
    w_logp, w_entropy, w_soft = torch.randn(3, rows, generator=gen, dtype=torch.float64)
    base_hidden = torch.randn(rows, width, generator=gen)
    base_weight = torch.randn(vocab, width, generator=gen) * 0.3
    return hidden, weight, bias, targets, (w_logp, w_entropy, w_soft), (base_hidden, base_weight)


def _autocast_logits(hidden, weight, bias=None):
    with torch.autocast(**BF16):
        z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    assert z.dtype == torch.bfloat16  # else the case tests nothing
    return z


def _reference_objective(z, targets, weights, base_logits=None):
    """sum_rows w_logp log p_y + w_H H (+ w_X X against softmax(base_logits)), in float64, rows with target -100 out."""
    w_logp, w_entropy, w_soft = weights
    valid = targets != IGNORE_INDEX
    logp = torch.log_softmax(z.double(), dim=-1)
    picked = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    total = w_logp * picked + w_entropy * entropy
    if base_logits is not None:
        r = torch.softmax(base_logits.double(), dim=-1)
        total = total + w_soft * -(r * logp).sum(-1)
    return (total * valid).sum()


def _objective(stats, weights, anchored=False):
    w_logp, w_entropy, w_soft = (w.float() for w in weights)
    total = (w_logp * stats.logprob + w_entropy * stats.entropy).sum()
    return total + (w_soft * stats.soft_ce).sum() if anchored else total


def _close(actual, expected, rel):
    """max |actual - expected| <= rel * max |expected|: bf16 keeps 8 bits, so products rounded to bf16 differ from
    the float64 chain by a few 2^-9 of the largest term."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("anchored", [False, True])
def test_linear_kernel_gradient_under_bf16_autocast_is_that_of_the_forward_logits(anchored):
    """LinearStats recomputes hidden @ W.T + b in backward: it must be the forward's bf16 product, so that the softmax
    it rebuilds with the forward's logsumexp sums to 1 (grad_bias sums to 0) and the gradient is the forward's own."""
    hidden, weight, bias, targets, weights, (base_hidden, base_weight) = _case()
    for t in (hidden, weight, bias):
        t.requires_grad_()
    anchor = None
    if anchored:  # the base-anchor recompute: the base's logits are a matmul too, bf16 in the forward
        base = BaseStates(base_hidden[None], base_weight)
        anchor = loss_anchor(LossConfig(name="aesl_anchor"), base, rows=None, grid=(1, hidden.shape[0]), vocab=weight.shape[0])
    with torch.autocast(**BF16):
        stats = linear_token_stats(hidden, weight, bias, targets, with_entropy=True, anchor=anchor, chunk_size=5)
        objective = _objective(stats, weights, anchored)
    objective.backward()  # outside autocast, as under Lightning

    z = _autocast_logits(hidden.detach(), weight.detach(), bias.detach())
    base_logits = _autocast_logits(base_hidden, base_weight) if anchored else None
    leaf = z.double().requires_grad_()
    (grad_z64,) = torch.autograd.grad(_reference_objective(leaf, targets, weights, base_logits), leaf)

    # the softmax rows sum to 1: each row's gradient sums to 0 over the vocabulary (fp32 accumulation, no bf16 step)
    assert abs(bias.grad.sum().item()) < 1e-5, bias.grad.sum().item()
    torch.testing.assert_close(bias.grad.double(), grad_z64.sum(0), rtol=0, atol=2e-5)
    # hidden and weight: the forward's bf16 weight / hidden times the float64 gradient of the logits
    w16, h16 = weight.detach().bfloat16().double(), hidden.detach().bfloat16().double()
    _close(hidden.grad, grad_z64 @ w16, rel=6e-3)
    _close(weight.grad, grad_z64.t() @ h16, rel=6e-3)


def test_logit_kernel_with_the_base_anchor_under_bf16_autocast():
    """LogitStats keeps the logits, but its base anchor recomputes the base's logits (a matmul) in backward: the
    soft cross-entropy's gradient p - r must use the r of the forward (bf16 under autocast)."""
    hidden, weight, _, targets, weights, (base_hidden, base_weight) = _case(seed=1)
    base = BaseStates(base_hidden[None], base_weight)
    anchor = loss_anchor(LossConfig(name="aesl_anchor"), base, rows=None, grid=(1, hidden.shape[0]), vocab=weight.shape[0])
    z = _autocast_logits(hidden, weight).requires_grad_()
    with torch.autocast(**BF16):
        stats = token_stats(z, targets, with_entropy=True, anchor=anchor, chunk_size=5)
        objective = _objective(stats, weights, anchored=True)
    objective.backward()

    leaf = z.detach().double().requires_grad_()
    (grad_z64,) = torch.autograd.grad(_reference_objective(leaf, targets, weights, _autocast_logits(base_hidden, base_weight)), leaf)
    # the kernel's gradient is rounded to bf16 (the logits' dtype) once: within 2^-8 of each value
    torch.testing.assert_close(z.grad.double(), grad_z64, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", ["ce", "aesl_anchor"])
def test_sft_losses_under_bf16_autocast_match_a_float64_reference(chunked, name):
    """sft_loss (the model's bf16 logits) and chunked_sft_loss (hidden states and the head): value and gradient with
    respect to the hidden states equal the float64 loss of the autocast forward's logits, chained through bf16."""
    batch, length, width, vocab = 2, 9, 32, 50
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(batch, length, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen) * 0.6
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :3] = labels[1, :2] = labels[1, -1] = IGNORE_INDEX
    base = BaseStates(torch.randn(batch, length, width, generator=gen), torch.randn(vocab, width, generator=gen) * 0.4)
    config = LossConfig(name=name, tau_tok=0.05, tau_seq=1.0)  # some tokens gated, so the anchor term is active
    with torch.autocast(**BF16):
        if chunked:
            out = chunked_sft_loss(hidden, weight, labels, config, chunk_size=4, base=base)
        else:
            out = sft_loss(hidden @ weight.t(), labels, config, base=base)
    out.loss.backward()

    z = _autocast_logits(hidden.detach().reshape(-1, width), weight).double().view(batch, length, vocab)[:, :-1]
    z.requires_grad_()
    logp = torch.log_softmax(z, dim=-1)
    targets, mask = labels[:, 1:].clamp(min=0), labels[:, 1:] != IGNORE_INDEX
    a = out.loss_weight.double()
    total = (a * -logp.gather(2, targets[..., None]).squeeze(2) * mask).sum()
    if name == "aesl_anchor":
        assert 0 < int((a < 1).sum()) < int(mask.sum())  # both terms present
        base_logr = torch.log_softmax(_autocast_logits(base.hidden.reshape(-1, width), base.weight).double(), -1).view(batch, length, vocab)[:, :-1]
        kl = (base_logr.exp() * (base_logr - logp)).sum(-1)
        total = total + (config.anchor_weight * (1 - a) * kl * mask).sum()
    reference = total / mask.sum()
    (grad_z,) = torch.autograd.grad(reference, z)
    grad_hidden = torch.zeros(batch, length, vocab, dtype=torch.float64)
    grad_hidden[:, :-1] = grad_z
    grad_hidden = grad_hidden @ weight.bfloat16().double()

    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    _close(hidden.grad, grad_hidden, rel=6e-3)
