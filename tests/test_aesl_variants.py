"""The AESL default, its base-anchored variants and GEM against a slow per-token float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from aesl_lightning.maths.gates import prefix_mean
from aesl_lightning.maths.losses import LOSSES, BaseStates, LossConfig, aesl, ce, chunked_sft_loss, learned_share, resolve_quantiles, sft_loss

IGNORE = -100
VARIANTS = ["aesl", "aesl_anchor", "aesl_entropy_floor", "aesl_drift"]


def reference_loss(logits, labels, config: LossConfig, base_logits=None):
    """Walk every completion token with python floats for the (detached) gates; returns the differentiable loss."""
    batch, length, _ = logits.shape
    total, count = logits.new_zeros(()), 0
    hard = lambda x, tau: 1.0 if tau >= 1 or x < tau else 0.0  # noqa: E731
    for b in range(batch):
        history: list[tuple[float, float]] = []  # (log p, log p0) of earlier completion tokens
        for t in range(length - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE:
                history = []  # a masked position ends the completion span: the next one starts a new prefix
                continue
            logp_all = torch.log_softmax(logits[b, t], -1)
            logp = logp_all[y]
            lp, p = float(logp.detach()), math.exp(float(logp.detach()))
            window = history[-config.window:] if config.window else history
            term = None
            if config.name == "gem":
                q = torch.softmax(logits[b, t].detach() / config.gem_beta, -1)
                term = -(q * (logp - logp_all)).sum()
            else:
                base_all = torch.log_softmax(base_logits[b, t], -1) if base_logits is not None else None
                lp0 = float(base_all[y]) if base_all is not None else 0.0
                conf = math.exp(sum(x for x, _ in window) / len(window)) if window else 0.0
                w_tok = hard(p, config.tau_tok)
                if config.name in ("aesl", "aesl_anchor"):
                    w_seq = 1.0 if config.tau_seq >= 1 or conf < config.tau_seq else config.rho
                elif config.name == "aesl_entropy_floor":
                    h = float(-(logp_all.exp() * logp_all).sum().detach())
                    h0 = float(-(base_all.exp() * base_all).sum())
                    w_seq = config.rho if h < h0 - config.entropy_margin else 1.0
                else:  # drift
                    drift = sum(x - x0 for x, x0 in window) / len(window) if window else 0.0
                    w_seq = config.rho if drift > config.drift_margin else 1.0
                w = 1.0 if p < config.protect_below else w_tok * w_seq
                term = w * -logp
                if config.name == "aesl_anchor" and w < 1:
                    kl = (base_all.exp() * (base_all - logp_all)).sum()
                    term = term + config.anchor_weight * (1 - w) * kl
                history.append((lp, lp0))
            total = total + term
            count += 1
    return total / max(count, 1)


def make(batch=3, length=12, vocab=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 2
    lift = (torch.rand(batch, length, generator=gen) < 0.6).double() * 6  # many confident tokens, some not
    logits.scatter_add_(2, labels.roll(-1, 1)[..., None], lift[..., None])
    labels[:, :2] = IGNORE
    labels[1, 6] = IGNORE  # a hole: two completion spans in one row (as in a packed row)
    labels[2, -2:] = IGNORE
    width = 5
    base_hidden = torch.randn(batch, length, width, generator=gen, dtype=torch.float64)
    base_head = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    base_hidden = base_hidden + 0.8 * base_head[labels.roll(-1, 1).clamp(min=0)]
    return logits.requires_grad_(), labels, BaseStates(base_hidden, base_head)


CONFIGS = [
    LossConfig(name=name, tau_tok=tau_tok, tau_seq=tau_seq, rho=rho, window=window, entropy_margin=0.3, drift_margin=0.2, anchor_weight=0.7)
    for name in VARIANTS for (tau_tok, tau_seq, rho, window) in [(0.9, 0.9, 0.0, 8), (0.7, 0.6, 0.25, 3), (0.95, 0.8, 0.0, 0)]
] + [LossConfig(name="gem", gem_beta=beta) for beta in (0.7, 0.3)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{c.tau_tok}-{c.tau_seq}-{c.rho}-w{c.window}-b{c.gem_beta}")
def test_values_and_gradients_match_the_reference(config):
    logits, labels, base = make()
    out = sft_loss(logits, labels, config, base=base)
    (grad,) = torch.autograd.grad(out.loss, logits)
    ref = reference_loss(logits, labels, config, base.hidden @ base.weight.T)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    if config.name != "gem":
        weight = out.loss_weight[out.mask]
        assert (weight < 0.5).any() and (weight == 1).any(), "the batch should exercise both sides of the gates"


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name != "gem"][::2], ids=lambda c: f"{c.name}-w{c.window}")
def test_chunked_path_with_base_equals_logits_path(config):
    gen = torch.Generator().manual_seed(4)
    _, labels, base = make()
    hidden = torch.randn(*labels.shape, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    head = (base.weight + 0.3 * torch.randn(base.weight.shape, generator=gen, dtype=torch.float64)).requires_grad_()
    out = chunked_sft_loss(hidden, head, labels, config, chunk_size=4, base=base)
    ref = sft_loss(hidden @ head.T, labels, config, base=base)
    grads = torch.autograd.grad(out.loss, (hidden, head))
    ref_grads = torch.autograd.grad(ref.loss, (hidden, head))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-11, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kl_to_base, ref.kl_to_base, rtol=1e-10, atol=1e-12)


def _sequence(probs, vocab=5, prompt=2):
    labels = torch.full((1, prompt + len(probs)), IGNORE)
    labels[0, prompt:] = torch.arange(len(probs)) % vocab
    logits = torch.zeros(1, labels.shape[1], vocab, dtype=torch.float64)
    for i, p in enumerate(probs):
        logits[0, prompt - 1 + i, labels[0, prompt + i]] = math.log(p * (vocab - 1) / (1 - p))
    return logits.requires_grad_(), labels, slice(prompt - 1, prompt - 1 + len(probs))


@pytest.mark.parametrize("name", VARIANTS)
def test_unlearned_token_after_a_confident_prefix_keeps_its_whole_ce_gradient(name):
    logits, labels, cols = _sequence([0.99] * 6 + [0.002] + [0.99, 0.99, 0.01, 0.5])
    out = sft_loss(logits, labels, LossConfig(name=name), base=_zero_base(labels))
    (grad,) = torch.autograd.grad(out.loss, logits)
    (ce_grad,) = torch.autograd.grad(ce(logits, labels).loss, logits)
    for i in (6, 9):  # p = 0.002 after six confident tokens, p = 0.01 after two
        torch.testing.assert_close(grad[0, cols.start + i], ce_grad[0, cols.start + i], rtol=1e-12, atol=1e-15)
    # the first reading silences the p = 0.002 token: the regression this default fixes
    assert sft_loss(logits, labels, LossConfig(name="aesl_v1")).loss_weight[0, cols][6] == 0
    # ... and on p = [.99, .99, .01, .5] it learns [1, 0, 0, 1]: the one wrong token is not learned
    logits, labels, cols = _sequence([0.99, 0.99, 0.01, 0.5])
    assert sft_loss(logits, labels, LossConfig(name="aesl_v1", tau_tok=1.0)).loss_weight[0, cols].tolist() == [1, 0, 0, 1]
    new = sft_loss(logits, labels, LossConfig(name=name, tau_tok=1.0), base=_zero_base(labels))
    assert new.loss_weight[0, cols][2] == 1


def _zero_base(labels):
    return BaseStates(torch.zeros(1, labels.shape[1], 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("seed", range(4))
def test_guarantee_holds_on_random_batches_with_any_thresholds(name, seed):
    logits, labels, base = make(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tau_tok, tau_seq = (0.5 + 0.5 * torch.rand(2, generator=gen)).tolist()
    config = LossConfig(name=name, tau_tok=tau_tok, tau_seq=tau_seq * 0.5, window=seed, gate="soft" if seed % 2 else "hard")
    out = sft_loss(logits, labels, config, base=base)
    unlearned = out.mask & (out.token_logprob.exp() < 0.5)
    assert unlearned.any()
    assert (out.loss_weight[unlearned] >= 0.5).all()


def test_gated_token_with_minus_inf_target_logit_gives_no_nan():
    logits, labels, cols = _sequence([0.99] * 5 + [0.5])
    with torch.no_grad():
        logits[0, cols.start + 5, labels[0, cols.start + 6]] = -math.inf
    out = aesl(logits, labels, name="aesl_v1", tau_seq=0.9)
    assert out.loss_weight[0, cols][5] == 0
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_every_aesl_variant_at_thresholds_one_is_ce():
    logits, labels, base = make()
    want = torch.autograd.grad(ce(logits, labels).loss, logits)[0]
    for name in VARIANTS:
        config = LossConfig(name=name, tau_tok=1.0, tau_seq=1.0, entropy_margin=1e9, drift_margin=1e9)
        got = torch.autograd.grad(sft_loss(logits, labels, config, base=base).loss, logits)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=name)


def test_gem_gradient_is_sharpened_softmax_minus_onehot():
    logits, labels, _ = make()
    config = LossConfig(name="gem", gem_beta=0.5)
    out = sft_loss(logits, labels, config)
    (grad,) = torch.autograd.grad(out.loss, logits)
    mask = out.mask
    q = torch.softmax(logits.detach()[:, :-1] / 0.5, -1)
    onehot = torch.nn.functional.one_hot(labels[:, 1:].clamp(min=0), logits.shape[-1]).double()
    expected = (q - onehot) * mask[..., None] / mask.sum()
    torch.testing.assert_close(grad[:, :-1], expected, rtol=1e-10, atol=1e-13)


def test_base_anchored_losses_need_base_states():
    logits, labels, _ = make()
    with pytest.raises(ValueError, match="anchored to the base model"):
        sft_loss(logits, labels, LossConfig(name="aesl_anchor"))
    assert {"ce", "dft", "gem", "aesl", "aesl_v1"} | set(VARIANTS) <= set(LOSSES)
    with pytest.raises(ValueError, match=r"LossConfig\.name: expected one of"):
        LossConfig(name="nope")


@pytest.mark.parametrize("window", [0, 1, 3])
def test_prefix_mean_counts_the_tokens_of_its_own_completion_span(window):
    gen = torch.Generator().manual_seed(window)
    values = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 10, generator=gen) < 0.7
    mean, count = prefix_mean(values, mask, window)
    for b in range(3):
        seen = []
        for t in range(10):
            if not mask[b, t]:
                assert mean[b, t] == 0 and count[b, t] == 0
                seen = []  # a masked position ends the span
                continue
            part = seen[-window:] if window else seen
            assert count[b, t] == len(part)
            assert abs(float(mean[b, t]) - (sum(part) / len(part) if part else 0.0)) < 1e-12
            seen.append(float(values[b, t]))


def test_quantile_calibration_sets_thresholds_from_the_start_models_statistics():
    logits, labels, _ = make()
    out = sft_loss(logits, labels, LossConfig(name="ce"))
    config = resolve_quantiles(LossConfig(tau_tok_quantile=0.6, tau_seq_quantile=0.5), [out.view])
    probs = out.token_logprob[out.mask].exp()
    assert config.tau_tok_quantile is None and config.tau_seq_quantile is None
    assert abs(config.tau_tok - float(torch.quantile(probs, 0.6))) < 1e-12
    gated = (probs >= config.tau_tok).double().mean()
    assert 0.3 <= gated <= 0.5  # about the 40% most confident tokens
    confidence = prefix_mean(out.token_logprob, out.mask, config.window)
    has_prefix = out.mask & (confidence[1] > 0)
    assert abs(config.tau_seq - float(torch.quantile(confidence[0].exp()[has_prefix], 0.5))) < 1e-12
    share, total = learned_share(config, [out.view])
    weight = sft_loss(logits, labels, config).loss_weight
    assert total == int(out.mask.sum()) and share == float((weight[out.mask] > 0.5).double().mean())

