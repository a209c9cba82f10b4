"""bf16 mixed precision: the fused kernels' gradients under CPU bf16 autocast, and bf16-mixed SFT / GRPO fits.

Lightning's `bf16-mixed` autocasts only around training_step: the forward runs under autocast, the backward
outside it. The references here take the logits the autocast forward produced (a bf16 matmul), then compute
the loss in float64 with plain autograd: the exact gradient of the loss the forward computed.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from aesl_lightning.maths.anchors import BaseStates, loss_anchor
from aesl_lightning.ops.kernels import IGNORE_INDEX, linear_token_stats, set_cpu_workers, token_stats
from aesl_lightning.infra.lora import LoRAConfig
from aesl_lightning.maths.losses import LossConfig, chunked_sft_loss, sft_loss

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    set_cpu_workers(2)  # the chunks on worker threads, which must take over the caller's autocast state
    try:
        with torch.autocast(**BF16):
            stats = token_stats(z, targets, with_entropy=True, anchor=anchor, chunk_size=5)
            objective = _objective(stats, weights, anchored=True)
        objective.backward()
    finally:
        set_cpu_workers(None)

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


# ---------------------------------------------------------------------------------------------------------- fits
# The tiny random model's logits are near-uniform, so bf16 rounding moves its losses by ~1e-4 (measured: at most
# 6e-4 over 4 SFT steps, 5e-4 on the validation after them, 2e-4 on the first GRPO step); the tolerances below
# leave ~10x room.


class _Losses(L.Callback):
    def __init__(self, key: str):
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics[self.key]))


def _fit_trainer(tmp_path, precision, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, log_every_n_steps=1,
                    limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs}, precision=precision)


@pytest.mark.parametrize(("lora", "chunk_size", "loss"), [
    (None, None, "aesl"), (None, 7, "aesl"), (LoRAConfig(r=4), None, "aesl"), (LoRAConfig(r=4), 7, "aesl_anchor"),
], ids=["full", "full-chunked", "lora", "lora-chunked-anchored"])
def test_sft_fit_under_bf16_mixed_follows_the_fp32_run(tmp_path, lora, chunk_size, loss):
    """4 SFT steps (logits and chunked paths; the base-anchored loss with the adapter-disabled base) under `bf16-mixed`,
    then a validation: every train/loss and the validation's loss, entropy and KL to the base are finite and within
    5e-3 of the float32 run with the same seed (and not identical to it: bf16 did run)."""
    from aesl_lightning.data import SFTDataModule
    from aesl_lightning.data.synthetic import ArithmeticConfig
    from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

    runs, validation = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        module = SFTModule("tiny-llama", lr=3e-3, warmup_steps=0, lora=lora, loss=LossConfig(name=loss, chunk_size=chunk_size),
                           val_generation=ValidationGeneration(num_prompts=0, kl_to_base=True), gate_check_batches=0)
        data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=16, seed=1, max_steps=1), val_size=4,
                             batch_size=4, max_length=400)
        record = _Losses("train/loss")
        trainer = _fit_trainer(tmp_path, precision, max_steps=4, callbacks=[record], limit_val_batches=1, val_check_interval=4)
        trainer.fit(module, data)
        assert trainer.precision == precision
        runs[precision] = torch.tensor(record.values)
        validation[precision] = torch.tensor([float(trainer.callback_metrics[f"val/{k}"]) for k in ("loss", "token_entropy", "kl_to_base")])
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    assert len(bf16) == 4 and bf16.isfinite().all()
    assert (bf16 - fp32).abs().max() <= 5e-3, (fp32, bf16)
    assert (bf16 != fp32).any()
    assert fp32[-1] < fp32[0] - 0.1  # the runs learn something, so the comparison is over moving weights
    assert validation["bf16-mixed"].isfinite().all() and validation["32-true"][2] > 0
    assert (validation["bf16-mixed"] - validation["32-true"]).abs().max() <= 5e-3, validation


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_validation_generation_runs_under_the_runs_precision(tmp_path, precision):
    """Validation generation runs after the validation epoch, outside Lightning's autocast around the *_step hooks: it
    must enter the precision's forward context itself (bf16 autocast under bf16-mixed, none under 32-true)."""
    from aesl_lightning.data import SFTDataModule
    from aesl_lightning.data.synthetic import ArithmeticConfig
    from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

    L.seed_everything(0)
    module = SFTModule("tiny-llama", lr=3e-3, warmup_steps=0, gate_check_batches=0,
                       val_generation=ValidationGeneration(num_prompts=2, num_samples=2, max_new_tokens=3, batch_size=2))
    seen = []
    update = module.evaluator.update

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return update(*args, **kwargs)

    module.evaluator.update = spy
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=8, seed=1, max_steps=1), val_size=2,
                         batch_size=2, max_length=400)
    _fit_trainer(tmp_path, precision, max_steps=1, limit_val_batches=1, val_check_interval=1).fit(module, data)
    assert seen, "no validation generation ran"
    expected = (True, torch.bfloat16) if precision == "bf16-mixed" else (False,)
    assert all(s[:len(expected)] == expected for s in seen), seen
    assert not torch.is_autocast_enabled("cpu")  # and nothing is left switched on after the fit


def _grpo_module(lora):
    from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule

    config = GRPOConfig(num_generations=4, max_new_tokens=6, beta=0.04, num_iterations=2, log_completions_every_n_steps=0,
                        reward_funcs=[f"{__name__}.high_chars"])
    return GRPOModule("tiny-llama", lora=lora, lr=1e-2, grpo=config, evaluation=GRPOEvaluation(num_samples=0))


def _prompts(num_examples=4):
    from aesl_lightning.data import PromptDataModule
    from aesl_lightning.data.synthetic import ArithmeticConfig

    return PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=num_examples, seed=1, max_steps=1),
                            val_size=0, test_size=0, batch_size=2, max_prompt_length=400)


def high_chars(prompts, completions, **_):
    """A reward in [0, 1]: the mean code point of the completion text."""
    return [sum((ord(c) - 32) / 94 for c in text) / len(text) if text else 0.0 for text in completions]


@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4)], ids=["full", "lora"])
def test_grpo_policy_pass_and_loss_under_bf16_autocast_match_fp32(lora):
    """On one rollout: the policy's log-probs and entropies under bf16 autocast are float32 and within bf16 rounding
    of the float32 pass (mean |d log p| <= 5e-3, max 3e-2; measured 6e-4 and 4e-3), the loss stays float32 and the
    gradient (backward outside autocast) is within 3% of the float32 one (measured 0.6%)."""
    from aesl_lightning.maths.grpo_loss import grpo_loss

    L.seed_everything(0)
    module = _grpo_module(lora)
    data = _prompts()
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    rollout = module.make_rollout(next(iter(data.train_dataloader())))
    gen, mask = rollout.generation, rollout.generation.completion_mask
    passes = []
    for enabled in (False, True):
        module.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            logp, entropy = module.sequence_log_probs(module.model, rollout.input_ids, rollout.attention_mask, gen.completion_ids,
                                                      mask, return_entropy=True)
            out = grpo_loss(logp, rollout.old_logp, rollout.advantages, rollout.loss_mask, rollout.ref_logp, beta=0.04)
        out.loss.backward()
        assert logp.dtype == entropy.dtype == out.loss.dtype == out.kl.dtype == torch.float32
        assert out.loss.isfinite()
        grad = torch.cat([p.grad.reshape(-1) for p in module.model.parameters() if p.grad is not None])
        passes.append((logp.detach(), entropy, grad))
    (logp32, entropy32, grad32), (logp16, entropy16, grad16) = passes
    assert not torch.equal(logp16, logp32)  # the autocast pass did run in bf16
    difference = (logp16 - logp32)[mask].abs()
    assert difference.mean() <= 5e-3 and difference.max() <= 3e-2, (difference.mean(), difference.max())
    assert (entropy16 - entropy32)[mask].abs().max() <= 1e-2
    assert (grad16 - grad32).norm() <= 0.03 * grad32.norm()


@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4)], ids=["full", "lora"])
def test_grpo_fit_under_bf16_mixed(tmp_path, monkeypatch, lora):
    """A GRPO fit (mu = 2, beta > 0) under `bf16-mixed`: log-probs float32, ratio exactly 1 at the first inner
    iteration (the old log-probs come from the same bf16 pass), every logged train/ metric finite, and the first
    step's loss within 5e-3 of the float32 run with the same seed."""
    import aesl_lightning.modules.grpo as grpo_module

    real = grpo_module.grpo_loss
    first_loss = {}
    for precision in ("32-true", "bf16-mixed"):
        calls = []

        def recording(logp, old_logp, *args, **kwargs):
            out = real(logp, old_logp, *args, **kwargs)
            calls.append((logp.dtype, torch.equal(logp.detach(), old_logp), out.ratio_mean.item()))
            return out

        monkeypatch.setattr(grpo_module, "grpo_loss", recording)
        L.seed_everything(0)
        module = _grpo_module(lora)
        record = _Losses("train/loss")
        trainer = _fit_trainer(tmp_path, precision, max_steps=2, callbacks=[record])
        trainer.fit(module, _prompts(num_examples=2))
        assert len(calls) == 2
        assert all(dtype == torch.float32 for dtype, _, _ in calls)
        assert calls[0][1] and calls[0][2] == 1.0
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        assert "train/kl" in metrics and "train/entropy" in metrics
        assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
        first_loss[precision] = record.values[0]
    assert abs(first_loss["bf16-mixed"] - first_loss["32-true"]) <= 5e-3, first_loss
