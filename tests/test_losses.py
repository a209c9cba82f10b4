"""SFT losses against a slow per-token reference, and the chunked paths against the plain ones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import aesl_lightning.maths.losses as losses
import aesl_lightning.ops.kernels as kernels
from aesl_lightning.maths.losses import LossConfig, aesl, ce, chunked_sft_loss, dft, sft_loss, token_entropy

IGNORE = -100


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """The equations walked token by token (ce, dft, aesl_v1): gates from python floats (so detached), prefix as a list."""
    batch, length, _ = logits.shape
    total, count = logits.new_zeros(()), 0
    for b in range(batch):
        prefix: list[float] = []
        for t in range(length - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            logp = torch.log_softmax(logits[b, t], dim=-1)[target]
            p = math.exp(float(logp.detach()))
            if config.name == "ce":
                weight = 1.0
            elif config.name == "dft":
                weight = p
            else:
                confidence = math.exp(sum(prefix) / len(prefix)) if prefix else 0.0
                if config.gate == "hard":
                    w_tok = 1.0 if config.tau_tok >= 1 or p < config.tau_tok else 0.0
                    w_seq = 1.0 if config.tau_seq >= 1 or confidence < config.tau_seq else config.rho
                else:
                    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
                    w_tok = sig((config.tau_tok - p) / config.softness)
                    w_seq = config.rho + (1 - config.rho) * sig((config.tau_seq - confidence) / config.softness)
                weight = w_tok * w_seq
            prefix.append(float(logp.detach()))
            total = total + weight * -logp
            count += 1
    return total / max(count, 1)


def make_batch(batch=3, length=9, vocab=11, scale=3.0, dtype=torch.float64, seed=0):
    """Random logits (scaled so target probabilities spread over (0, 1)), prompts and right padding."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * scale
    # Lift the target logit on about half of the positions so that some tokens are confident.
    lift = torch.rand(batch, length, generator=gen) < 0.5
    shifted = labels.roll(-1, dims=1)
    logits.scatter_add_(2, shifted[..., None], (lift * 2 * scale).to(logits.dtype)[..., None])
    for b in range(batch):
        labels[b, : 1 + b] = IGNORE  # prompt of b + 1 tokens
        if b == batch - 1:
            labels[b, -2:] = IGNORE  # padding
    return logits.to(dtype).requires_grad_(), labels


def loss_and_grad(fn, logits):
    logits.grad = None
    loss = fn(logits)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    return loss.detach(), grad


AESL_CONFIGS = [
    LossConfig(name="aesl_v1", tau_tok=0.6, tau_seq=0.3, rho=0.0, gate="hard"),
    LossConfig(name="aesl_v1", tau_tok=0.8, tau_seq=0.2, rho=0.25, gate="hard"),
    LossConfig(name="aesl_v1", tau_tok=0.9, tau_seq=0.9, rho=0.0, gate="hard"),
    LossConfig(name="aesl_v1", tau_tok=0.6, tau_seq=0.3, rho=0.1, gate="soft", softness=0.1),
    LossConfig(name="aesl_v1", tau_tok=1.0, tau_seq=0.5, rho=0.5, gate="soft", softness=0.03),
]


def test_ce_equals_f_cross_entropy_on_shifted_labels():
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        logits, labels = make_batch(dtype=dtype)
        vocab = logits.shape[-1]
        ours = loss_and_grad(lambda x: ce(x, labels).loss, logits)
        ref = loss_and_grad(lambda x: F.cross_entropy(x[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE), logits)
        torch.testing.assert_close(ours[0], ref[0].to(ours[0].dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(ours[1], ref[1], rtol=tol, atol=tol)


def test_dft_matches_reference():
    logits, labels = make_batch()
    ours = loss_and_grad(lambda x: dft(x, labels).loss, logits)
    ref = loss_and_grad(lambda x: reference_loss(x, labels, LossConfig(name="dft")), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    out = dft(logits, labels)
    torch.testing.assert_close(out.loss_weight, out.token_logprob.exp() * out.mask)


@pytest.mark.parametrize("config", AESL_CONFIGS, ids=lambda c: f"{c.gate}-tok{c.tau_tok}-seq{c.tau_seq}-rho{c.rho}")
@pytest.mark.parametrize("chunk_elems", [None, 25])  # 25 elements = 2 rows per chunk at V=11
def test_aesl_matches_reference(config, chunk_elems, monkeypatch):
    if chunk_elems:
        monkeypatch.setattr(kernels, "DEFAULT_CHUNK_ELEMS", chunk_elems)
    logits, labels = make_batch()
    ours = loss_and_grad(lambda x: sft_loss(x, labels, config).loss, logits)
    ref = loss_and_grad(lambda x: reference_loss(x, labels, config), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    if config.gate == "hard" and config.tau_tok < 1:
        weight = sft_loss(logits, labels, config).loss_weight[labels[:, 1:] != IGNORE]
        assert (weight == 0).any() and (weight == 1).any(), "the test batch should exercise both sides of the gate"


def test_aesl_large_vocab_matches_reference():
    logits, labels = make_batch(batch=2, length=7, vocab=1000, scale=4.0)
    config = LossConfig(name="aesl_v1", tau_tok=0.5, tau_seq=0.4, rho=0.2)
    ours = loss_and_grad(lambda x: sft_loss(x, labels, config).loss, logits)
    ref = loss_and_grad(lambda x: reference_loss(x, labels, config), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_gated_off_token_gets_exactly_zero_gradient():
    logits, labels = make_batch(dtype=torch.float32)
    out = aesl(logits, labels, name="aesl_v1", tau_tok=0.6, tau_seq=1.0)
    out.loss.backward()
    gated = out.mask & (out.token_gate == 0)
    learned = out.mask & (out.token_gate == 1)
    assert gated.any() and learned.any()
    grad = logits.grad[:, :-1]
    assert torch.all(grad[gated] == 0)
    assert torch.all(grad[learned].abs().sum(-1) > 0)


def test_subsequence_gate_switches_where_prefix_confidence_crosses_tau_seq():
    vocab = 5
    # Completion target probabilities: prefix geometric means 0, .5, .704, .788, .837, .862, .880, ...
    probs = [0.5, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.2]
    prompt = 2
    labels = torch.full((1, prompt + len(probs)), IGNORE)
    labels[0, prompt:] = torch.arange(len(probs)) % vocab
    logits = torch.zeros(1, labels.shape[1], vocab, dtype=torch.float64)
    for i, p in enumerate(probs):
        # p = e^a / (e^a + vocab - 1) at the position that predicts completion token i.
        logits[0, prompt - 1 + i, labels[0, prompt + i]] = math.log(p * (vocab - 1) / (1 - p))
    logits.requires_grad_()

    out = aesl(logits, labels, name="aesl_v1", tau_tok=1.0, tau_seq=0.85, rho=0.0)
    cols = slice(prompt - 1, prompt - 1 + len(probs))
    expected_confidence = [0.0] + [math.exp(sum(map(math.log, probs[:i])) / i) for i in range(1, len(probs))]
    torch.testing.assert_close(out.prefix_confidence[0, cols], torch.tensor(expected_confidence, dtype=torch.float64))
    torch.testing.assert_close(out.token_logprob[0, cols].exp(), torch.tensor(probs, dtype=torch.float64))
    # P crosses 0.85 between completion tokens 4 (0.837) and 5 (0.862): tokens 5, 6, 7 are relaxed.
    assert out.seq_gate[0, cols].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    out.loss.backward()
    assert torch.all(logits.grad[0, prompt - 1 + 5 :] == 0)
    assert torch.all(logits.grad[0, prompt - 1 : prompt - 1 + 5].abs().sum(-1) > 0)
    # Only tokens 0..4 are learned, but the normaliser still counts all 8.
    torch.testing.assert_close(out.loss, -out.token_logprob[0, cols][:5].sum() / 8)
    stats = out.gate_stats()
    torch.testing.assert_close(stats["seq_gate_mean"], torch.tensor(5 / 8, dtype=torch.float64))
    torch.testing.assert_close(stats["gated_off_fraction"], torch.tensor(3 / 8, dtype=torch.float64))

    relaxed = aesl(logits, labels, name="aesl_v1", tau_tok=1.0, tau_seq=0.85, rho=0.25)
    assert relaxed.seq_gate[0, cols].tolist() == [1, 1, 1, 1, 1, 0.25, 0.25, 0.25]
    # The first completion token is always learned, however low the threshold.
    assert aesl(logits, labels, name="aesl_v1", tau_tok=1.0, tau_seq=1e-6).seq_gate[0, prompt - 1] == 1


@pytest.mark.parametrize("config", [LossConfig(name="ce"), LossConfig(name="dft"), *AESL_CONFIGS[::2]])
def test_prompt_and_padding_positions_never_contribute(config):
    logits, labels = make_batch(dtype=torch.float32)
    loss, grad = loss_and_grad(lambda x: sft_loss(x, labels, config).loss, logits)
    ignored = torch.ones(labels.shape, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == IGNORE  # rows whose shifted label is -100, plus every last row
    assert torch.all(grad[ignored] == 0)

    changed = logits.detach().clone()
    changed[ignored] = torch.randn_like(changed[ignored]) * 50
    changed.requires_grad_()
    loss2, grad2 = loss_and_grad(lambda x: sft_loss(x, labels, config).loss, changed)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_aesl_with_hard_thresholds_at_one_is_exactly_ce(dtype):
    logits, labels = make_batch(dtype=dtype)
    with torch.no_grad():  # targets so confident that p_t rounds to exactly 1.0
        logits[0, 3, labels[0, 4]] = 200.0
        logits[1, 5, labels[1, 6]] = 200.0
    config = LossConfig(name="aesl_v1", tau_tok=1.0, tau_seq=1.0, gate="hard")
    assert sft_loss(logits, labels, config).token_logprob[0, 3] == 0  # p == 1.0 exactly
    a = loss_and_grad(lambda x: sft_loss(x, labels, config).loss, logits)
    c = loss_and_grad(lambda x: ce(x, labels).loss, logits)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_all_masked_batch_gives_zero_loss_and_no_nan():
    logits, labels = make_batch(dtype=torch.float32)
    labels = torch.full_like(labels, IGNORE)
    for config in (LossConfig(name="ce"), LossConfig(name="dft"), *AESL_CONFIGS):
        out = sft_loss(logits, labels, config, return_entropy=True)
        out.loss.backward()
        assert out.loss.item() == 0 and out.loss.requires_grad
        assert torch.all(logits.grad == 0)
        logits.grad = None
        assert all(torch.isfinite(v).all() for v in out.gate_stats().values())
    weight = torch.randn(logits.shape[-1], 4, requires_grad=True)
    hidden = torch.randn(*labels.shape, 4, requires_grad=True)
    out = chunked_sft_loss(hidden, weight, labels, LossConfig())
    out.loss.backward()
    assert out.loss.item() == 0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    # A single-token sequence has nothing to predict.
    assert ce(logits[:, :1], labels[:, :1]).loss.item() == 0


def test_entropy_and_accuracy_match_categorical_and_argmax():
    logits, labels = make_batch(vocab=50, scale=2.0)
    out = sft_loss(logits, labels, LossConfig(), return_entropy=True)
    shifted = logits.detach()[:, :-1]
    expected = torch.distributions.Categorical(logits=shifted).entropy() * out.mask
    torch.testing.assert_close(out.entropy, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.token_correct, (shifted.argmax(-1) == labels[:, 1:]) & out.mask)
    stats = out.gate_stats()
    torch.testing.assert_close(stats["token_entropy"], expected[out.mask].mean())
    torch.testing.assert_close(stats["token_accuracy"], out.token_correct[out.mask].double().mean())
    torch.testing.assert_close(stats["token_prob_mean"], out.token_logprob[out.mask].exp().mean())

    categorical = torch.distributions.Categorical(logits=logits.detach()).entropy()
    torch.testing.assert_close(token_entropy(logits, chunk_size=4, reduction="none"), categorical)
    mask = labels != IGNORE
    torch.testing.assert_close(token_entropy(logits, mask, chunk_size=5), categorical[mask].mean())
    torch.testing.assert_close(token_entropy(logits, mask, reduction="sum"), categorical[mask].sum())
    minus_inf = logits.detach().clone()
    minus_inf[..., :10] = -math.inf  # masked vocabulary entries contribute 0 * log 0 = 0
    torch.testing.assert_close(token_entropy(minus_inf, reduction="none"), torch.distributions.Categorical(logits=minus_inf).entropy())


def _linear_inputs(dtype, vocab=37, width=8, seed=1):
    logits, labels = make_batch(batch=3, length=7, vocab=vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    hidden = torch.randn(3, 7, width, generator=gen, dtype=torch.float64)
    # Point about half of the hidden states at their target's LM-head row so that some tokens are confident.
    lift = (torch.rand(3, 7, 1, generator=gen) < 0.5) * 1.5
    hidden = hidden + lift * weight[labels.roll(-1, dims=1).clamp(min=0)]
    hidden, weight = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return hidden, weight, bias, labels


def _run_linear(hidden, weight, bias, labels, config, chunk_size):
    params = (hidden, weight, bias)
    for p in params:
        p.grad = None
    if chunk_size is None:
        logits = hidden @ weight.t() + bias
        out = sft_loss(logits, labels, config, return_entropy=True)
    else:
        out = chunked_sft_loss(hidden, weight, labels, config, lm_head_bias=bias, chunk_size=chunk_size, return_entropy=True)
    out.loss.backward()
    return out, [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 6, 1000])  # 14 completion tokens in 21 = 3 x 7 positions
@pytest.mark.parametrize("config", [LossConfig(name="ce"), LossConfig(name="dft"), AESL_CONFIGS[0], AESL_CONFIGS[3]], ids=["ce", "dft", "hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_path_equals_unchunked(chunk_size, config, dtype):
    hidden, weight, bias, labels = _linear_inputs(dtype)
    ref, ref_grads = _run_linear(hidden, weight, bias, labels, config, None)
    out, grads = _run_linear(hidden, weight, bias, labels, config, chunk_size)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    for name in ("token_logprob", "entropy", "loss_weight", "token_gate", "seq_gate", "prefix_confidence"):
        if getattr(ref, name) is not None:
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol, msg=name)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.token_correct, ref.token_correct)
    for got, want, name in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, **tol, msg=f"grad {name}")
    if config.name == "aesl_v1" and config.gate == "hard":
        assert (out.loss_weight[out.mask] == 0).any(), "the test batch should gate some tokens off"


def test_chunked_path_uses_config_chunk_size_and_needs_no_bias():
    hidden, weight, _, labels = _linear_inputs(torch.float64)
    out = chunked_sft_loss(hidden, weight, labels, LossConfig(chunk_size=3))
    out.loss.backward()
    ref = sft_loss(hidden @ weight.t(), labels, LossConfig())
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    grads = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ref.loss.backward()
    torch.testing.assert_close(grads, (hidden.grad, weight.grad), rtol=1e-12, atol=1e-12)


def test_bf16_logits():
    logits32, labels = make_batch(vocab=50, dtype=torch.float32)
    logits16 = logits32.detach().bfloat16().requires_grad_()
    exact = logits16.detach().float().requires_grad_()  # same values, computed in fp32
    config = AESL_CONFIGS[3]
    out16 = sft_loss(logits16, labels, config, return_entropy=True)
    out32 = sft_loss(exact, labels, config, return_entropy=True)
    assert out16.loss.dtype == torch.float32  # softmax runs in fp32
    torch.testing.assert_close(out16.loss, out32.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out16.entropy, out32.entropy, rtol=1e-6, atol=1e-6)
    out16.loss.backward()
    out32.loss.backward()
    assert logits16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits16.grad.float(), exact.grad, rtol=1e-2, atol=1e-4)

    hidden, weight, bias, labels = _linear_inputs(torch.float32)
    ref, ref_grads = _run_linear(hidden, weight, bias, labels, config, None)
    bf = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    out, grads = _run_linear(*bf, labels, config, 4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=3e-2, atol=3e-2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=2e-2)


def test_num_tokens_overrides_the_normaliser():
    logits, labels = make_batch()
    out = sft_loss(logits, labels, LossConfig(name="ce"))
    count = int(out.mask.sum())
    torch.testing.assert_close(sft_loss(logits, labels, LossConfig(name="ce"), num_tokens=4 * count).loss, out.loss / 4)


def test_bad_inputs_raise_errors_that_name_the_problem():
    with pytest.raises(ValueError, match=r"LossConfig\.rho"):
        LossConfig(rho=1.5)
    with pytest.raises(ValueError, match=r"LossConfig\.gate"):
        LossConfig(gate="smooth")
    with pytest.raises(ValueError, match=r"LossConfig\.tau_seq"):
        LossConfig(tau_seq=0)
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="labels must be"):
        sft_loss(logits, labels[:, :-1])
    bad = labels.clone()
    bad[0, -1] = 11
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        sft_loss(logits, bad)


def test_hard_token_gate_is_off_at_exactly_tau():
    logits = torch.zeros(1, 3, 2, dtype=torch.float64)  # p_t = 0.5 exactly
    logits[0, 1, 1] = 1.0  # p_t = e / (e + 1) = 0.731
    labels = torch.tensor([[IGNORE, 1, 1]])
    assert aesl(logits, labels, name="aesl_v1", tau_tok=0.5, tau_seq=1.0).token_gate[0].tolist() == [0.0, 0.0]
    assert aesl(logits, labels, name="aesl_v1", tau_tok=0.6, tau_seq=1.0).token_gate[0].tolist() == [1.0, 0.0]
    assert aesl(logits, labels, name="aesl_v1", tau_tok=0.75, tau_seq=1.0).token_gate[0].tolist() == [1.0, 1.0]
