"""The GRPO maths against slow per-element reference loops on hand-built tensors."""

import math

import pytest
import torch

from aesl_lightning.maths.grpo_loss import (
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    kl_k3,
    register_importance_sampling,
)
import aesl_lightning.maths.grpo_loss as grpo_loss_module
from aesl_lightning.modules.grpo import GRPOConfig


def _std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_group_advantages_match_a_loop_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 0.5])
    got = group_advantages(rewards, group_size=4, scale="group", eps=1e-4)
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mean, std = sum(group) / 4, _std(group)
        for j, r in enumerate(group):
            assert got[4 * g + j].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5)
    # the single correct answer of group 0 is pushed up, the others down
    assert got[0] > 0 and (got[1:4] < 0).all()


def test_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    batch_std = _std(rewards.tolist())
    got = group_advantages(rewards, 2, scale="batch", eps=0.0)
    expected = [0.5 / batch_std, -0.5 / batch_std, 1.0 / batch_std, -1.0 / batch_std]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert group_advantages(rewards, 2, scale="none").tolist() == [0.5, -0.5, 1.0, -1.0]


def test_zero_variance_groups_give_zero_advantage_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    for scale in ("group", "batch", "none"):
        got = group_advantages(rewards, 3, scale=scale)
        assert torch.isfinite(got).all()
        assert got[:6].abs().max() == 0.0
        assert got[6 + 1] > 0
    assert group_advantages(torch.tensor([0.3, 0.7]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 2)


def _slow_surrogate(logp, old, adv, eps_low, eps_high):
    loss = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            loss[i, t] = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
    return loss


def test_clipped_surrogate_value_and_zero_gradient_exactly_in_the_clip_region():
    # ratios 0.5, 0.9, 1.0, 1.1, 1.5 against advantage +1 (row 0) and -1 (row 1); eps_low 0.2, eps_high 0.28
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])
    old = torch.full((2, 5), -1.0)
    logp = (old + ratios.log()).clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    out = clipped_surrogate(logp, old, adv, torch.ones(2, 5, dtype=torch.bool), eps_low=0.2, eps_high=0.28)
    assert torch.allclose(out.loss, _slow_surrogate(logp.detach(), old, adv, 0.2, 0.28), atol=1e-6)
    out.loss.sum().backward()
    zero_grad = logp.grad == 0
    # A > 0: clipped only above 1 + eps_high (ratio 1.5); A < 0: only below 1 - eps_low (ratio 0.5)
    assert zero_grad.tolist() == [[False, False, False, False, True], [True, False, False, False, False]]
    assert out.clipped_high.tolist()[0] == [False, False, False, False, True]
    assert out.clipped_low.tolist()[1] == [True, False, False, False, False]
    assert not out.clipped_low[0].any() and not out.clipped_high[1].any()


def test_clipped_surrogate_masks_padding():
    logp = torch.zeros(1, 3)
    old = torch.full((1, 3), -2.0)  # ratio e^2, clipped for A > 0
    out = clipped_surrogate(logp, old, torch.tensor([1.0]), torch.tensor([[True, True, False]]))
    assert out.loss[0, 2] == 0 and out.clipped_high.tolist() == [[True, True, False]]


def test_kl_k3_value_and_non_negativity():
    logp = torch.tensor([-1.0, -2.0, -0.1, -3.0])
    ref = torch.tensor([-1.0, -1.0, -2.0, -0.5])
    got = kl_k3(logp, ref)
    for i in range(4):
        d = ref[i].item() - logp[i].item()
        assert got[i].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-6, abs=1e-7)
    assert got[0] == 0
    random = kl_k3(torch.randn(1000), torch.randn(1000))
    assert (random >= 0).all()


def test_kl_k3_is_an_unbiased_estimate_of_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_k3(p.log()[samples], q.log()[samples]).mean()
    assert estimate.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=0.03)


def test_aggregation_normalisers():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # grpo: mean of per-sequence means = ((1+2+3)/3 + 4/1) / 2
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.0)
    # dapo: all tokens together = (1+2+3+4) / 4
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "dapo", num_tokens=8).item() == pytest.approx(10 / 8)
    # dr_grpo: sum / (N * max_completion_length)
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=10).item() == pytest.approx(10 / 20)
    assert aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(10 / 8)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    for mode in ("grpo", "dapo", "dr_grpo"):
        assert aggregate(per_token, empty, mode).item() == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(per_token, mask, "bnpo")


def test_grpo_loss_with_one_iteration_is_the_policy_gradient():
    # mu = 1: old = logp.detach(), ratio 1, grad of the grpo aggregate is -A_i / |o_i| per token
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    out = grpo_loss(logp, logp.detach(), adv, mask, loss_type="grpo")
    out.loss.backward()
    expected = torch.tensor([[-1 / 2, -1 / 2, 0.0], [2 / 3, 2 / 3, 2 / 3]]) / 2
    assert torch.allclose(logp.grad, expected)
    assert out.clip_total.item() == 0 and out.ratio_mean.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(-(1.0 - 2.0) / 2)


def test_grpo_loss_uses_old_log_probs_for_later_iterations():
    # mu > 1: the ratio is against the generation-time log-probs, so a moved policy gets clipped
    old = torch.full((1, 2), -1.0)
    logp = torch.tensor([[-1.0 + math.log(1.5), -1.0]], requires_grad=True)
    out = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), epsilon=0.2)
    out.loss.backward()
    assert out.clip_high.item() == pytest.approx(0.5) and out.clip_low.item() == 0
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    assert out.ratio_mean.item() == pytest.approx(1.25)


def test_grpo_loss_adds_beta_times_kl():
    torch.manual_seed(0)
    logp = torch.randn(3, 4) - 2
    ref = torch.randn(3, 4) - 2
    mask = torch.ones(3, 4, dtype=torch.bool)
    adv = torch.tensor([0.5, -0.5, 0.0])
    base = grpo_loss(logp, logp, adv, mask)
    with_kl = grpo_loss(logp, logp, adv, mask, ref_logp=ref, beta=0.1)
    kl = kl_k3(logp, ref)
    assert with_kl.loss.item() == pytest.approx(base.loss.item() + 0.1 * kl.mean().item(), rel=1e-5)
    assert with_kl.kl.item() == pytest.approx(kl.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, adv, mask, beta=0.1)


def test_batch_scale_with_the_global_std_matches_the_whole_batch():
    # each rank holds whole groups; scaled by the global batch std, its advantages are its slice of the global ones
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 3.0, 2.0, 0.0, 0.0, 5.0, 1.0, 1.0, 1.0])
    whole = group_advantages(rewards, 2, "batch")
    halves = [group_advantages(part, 2, "batch", batch_std=rewards.std()) for part in rewards.split(6)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    assert not torch.allclose(group_advantages(rewards[:6], 2, "batch"), whole[:6])  # the local std differs


# ------------------------------------------------------------------------------------------ GSPO (sequence level)
def _gspo_reference(logp, old, adv, mask, eps_low, eps_high):
    """GSPO's objective, written out per sequence: -(1/N) sum_i min(s_i A_i, clip(s_i) A_i),
    s_i = exp(mean over the completion's tokens of logp - old)."""
    terms = []
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        log_s = sum(logp[i, t] - old[i, t] for t in range(logp.shape[1]) if mask[i, t]) / max(n, 1)
        s = torch.exp(log_s)
        terms.append(-torch.minimum(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i]))
    return torch.stack(terms).mean()


def test_gspo_sequence_ratio_matches_a_per_sequence_reference_in_value_and_gradient():
    torch.manual_seed(4)
    old = torch.randn(4, 5).double() - 2
    moved = old + torch.tensor([[1e-4, 2e-4, 0.0, 5.0, 5.0],  # mean 1e-4: inside GSPO's tiny clip range
                                [0.01, 0.02, 0.0, 0.01, 0.01],  # ratio > 1 + 4e-4 with A > 0: clipped
                                [-0.01, -0.01, 0.0, 0.0, 0.0],  # ratio < 1 - 3e-4 with A < 0: clipped
                                [3e-4, -1e-4, 2e-4, 0.0, -9.0]]).double()  # inside; padding never counts
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0, -1.0, -0.5]).double()
    logp = moved.clone().requires_grad_(True)
    out = grpo_loss(logp, old, adv, mask, epsilon=3e-4, epsilon_high=4e-4, importance_sampling_level="sequence")
    ref_logp = moved.clone().requires_grad_(True)
    expected = _gspo_reference(ref_logp, old, adv, mask, 3e-4, 4e-4)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    # sequences 1 (ratio > 1 + eps_high, A > 0) and 2 (ratio < 1 - eps_low, A < 0) are clipped as a whole
    assert logp.grad[1].abs().sum() == 0 and logp.grad[2].abs().sum() == 0
    assert logp.grad[0, :3].abs().min() > 0 and logp.grad[0, 3:].abs().sum() == 0  # padding: no gradient
    assert out.clip_high.item() == pytest.approx(5 / 14) and out.clip_low.item() == pytest.approx(2 / 14)


def test_gspo_ratio_is_exactly_one_at_the_first_iteration_and_equals_grpo_there():
    torch.manual_seed(0)
    logp = (torch.randn(3, 6) - 1).requires_grad_(True)
    mask = torch.rand(3, 6) > 0.3
    adv = torch.tensor([0.7, -1.2, 0.4])
    sequence = grpo_loss(logp, logp.detach(), adv, mask, importance_sampling_level="sequence")
    assert sequence.ratio_mean.item() == 1.0 and sequence.clip_total.item() == 0
    (grad_seq,) = torch.autograd.grad(sequence.loss, logp)
    (grad_tok,) = torch.autograd.grad(grpo_loss(logp, logp.detach(), adv, mask).loss, logp)
    torch.testing.assert_close(grad_seq, grad_tok)  # with loss_type grpo, d s_i = s_i * mean_t d logp: same gradient


def test_importance_sampling_is_a_registry_and_unknown_levels_are_refused(monkeypatch):
    monkeypatch.setattr(grpo_loss_module, "IMPORTANCE_SAMPLING", dict(grpo_loss_module.IMPORTANCE_SAMPLING))

    @register_importance_sampling("test_half_token")
    def half(logp, old_logp, mask):
        return 0.5 * (logp - old_logp)

    logp, old = torch.tensor([[math.log(4.0)]]), torch.zeros(1, 1)
    out = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), epsilon=10.0,
                    importance_sampling_level="test_half_token")
    assert out.ratio_mean.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="already registered"):
        register_importance_sampling("sequence")(half)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), importance_sampling_level="seq")
    with pytest.raises(ValueError, match="grpo.importance_sampling_level"):
        GRPOConfig(importance_sampling_level="seq")
