"""Edge cases found by an independent maths audit (issue 23): each fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch

from aesl_lightning.grpo_loss import group_advantages
from aesl_lightning.rollout import reward_metrics

# ------------------------------------------------------------------------------------ zero-variance groups


def _formatted_but_wrong_group():
    """reward_weights [1.0, 0.1], G = 8: a group where every completion is formatted (0.1) but wrong (0), and a group
    with varied rewards; the weighted total as the GRPO step computes it (float32 nansum)."""
    weights = torch.tensor([1.0, 0.1])
    constant = torch.tensor([[0.0, 1.0]] * 8)
    varied = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    rewards = torch.cat([constant, varied])
    return rewards, weights, (rewards * weights).nansum(dim=1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_gets_advantage_exactly_zero(scale):
    rewards, _, total = _formatted_but_wrong_group()
    assert total[:8].tolist() == [total[0].item()] * 8  # the same float32 0.1 eight times
    advantages = group_advantages(total, 8, scale)
    assert advantages.dtype == torch.float32
    assert advantages[:8].tolist() == [0.0] * 8  # before: -7.45e-05 each (float32 mean of 0.1 is not 0.1)
    # the other group is unchanged: the float64 equation
    grouped = total.double().view(2, 8)
    centred = grouped[1] - grouped[1].mean()
    std = {"group": grouped[1].std(), "batch": total.double().std(), "none": torch.tensor(1.0, dtype=torch.float64)}[scale]
    expected = centred / (std + (0.0 if scale == "none" else 1e-4))
    torch.testing.assert_close(advantages[8:].double(), expected, rtol=1e-6, atol=1e-7)


def test_frac_reward_zero_std_counts_groups_of_equal_rewards():
    rewards, weights, _ = _formatted_but_wrong_group()
    metrics = reward_metrics(rewards, weights, ["accuracy", "format"], 8)
    assert metrics["train/frac_reward_zero_std"].item() == 0.5  # before: 0.0 (float32 std of 8 x 0.1 is ~1e-8)
    # within a reward function's own float noise (0.1 + 0.2 against 0.3) still one value; a real difference is not
    noisy = torch.tensor([[0.1 + 0.2]] * 4 + [[0.3]] * 4 + [[0.3]] * 7 + [[0.31]])
    metrics = reward_metrics(noisy, torch.tensor([1.0]), ["r"], 8)
    assert metrics["train/frac_reward_zero_std"].item() == 0.5
    assert group_advantages(noisy.squeeze(1), 8)[:8].abs().max().item() == 0.0
