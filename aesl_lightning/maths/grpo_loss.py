"""The GRPO objective as pure functions: group advantages, the clipped surrogate, k3 KL and aggregation.

Notation: N completions (rows), L completion positions, mask m_{i,t} in {0, 1} (True up to and including
the first EOS), log-probabilities logp = log pi_theta(o_{i,t} | q, o_{i,<t}) of the sampled tokens,
old_logp under the policy that sampled them (pi_old), ref_logp under the frozen reference.

    J = agg_{i,t} [ min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta * KL3_{i,t} ],
    rho_{i,t} = exp(log importance weight),   token level (GRPO): logp - old_logp

The loss is -J. The importance weight is a registry (`IMPORTANCE_SAMPLING`, `grpo.importance_sampling_level`):
a new RL objective's ratio is one function (logp, old_logp, mask) -> log weights, [N, L] or [N, 1], plus its
name; GSPO's sequence-level ratio is the second entry. Nothing here knows about Lightning, devices or ranks
(Shao et al. 2024; DAPO, Yu et al. 2025; Dr. GRPO, Liu et al. 2025; GSPO, Zheng et al. 2025). Names follow
TRL's GRPOConfig where one exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dapo", "dr_grpo"]
LogImportanceWeight = Callable[[Tensor, Tensor, Tensor], Tensor]
IMPORTANCE_SAMPLING: dict[str, LogImportanceWeight] = {}


def register_importance_sampling(name: str) -> Callable[[LogImportanceWeight], LogImportanceWeight]:
    """Register `f(logp, old_logp, mask) -> log importance weights` ([N, L], or [N, 1] for one weight per
    sequence) under `name`, the value of `grpo.importance_sampling_level` that selects it."""

    def add(func: LogImportanceWeight) -> LogImportanceWeight:
        if name in IMPORTANCE_SAMPLING:
            raise ValueError(f"importance sampling level {name!r} is already registered")
        IMPORTANCE_SAMPLING[name] = func
        return func

    return add


@register_importance_sampling("token")
def token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GRPO / PPO: one ratio per token, log rho_{i,t} = logp_{i,t} - old_logp_{i,t}."""
    return logp - old_logp


@register_importance_sampling("sequence")
def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO (Zheng et al. 2025): one length-normalised ratio per sequence, [N, 1],

        log s_i = (1 / |o_i|) sum_t m_{i,t} (logp_{i,t} - old_logp_{i,t}),

    applied to every token of completion i (clipped as a whole: GSPO's ranges are ~1e-3, e.g. 3e-4 / 4e-4)."""
    m = mask.to(logp.dtype)
    return ((logp - old_logp) * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)


ZERO_SPREAD_RTOL = 1e-6
"""A group's rewards count as all equal when max - min <= ZERO_SPREAD_RTOL * max(1, max |r|): float noise, not signal."""


def constant_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[N / group_size] bool: the groups (consecutive `group_size` rewards) whose rewards are all equal, up to
    `ZERO_SPREAD_RTOL` (a weighted sum of identical rewards is bit-identical, but a reward function's own float
    arithmetic, 0.1 + 0.2 against 0.3, is not). Such a group has nothing to learn from: its advantages are 0."""
    grouped = rewards.detach().reshape(-1, group_size).double()
    high, low = grouped.amax(dim=1), grouped.amin(dim=1)
    return (high - low) <= ZERO_SPREAD_RTOL * torch.maximum(high.abs(), low.abs()).clamp(min=1.0)


def group_advantages(rewards: Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = 1e-4,
                     batch_std: Tensor | float | None = None) -> Tensor:
    """A_i = (r_i - mean_g(r)) / (std + eps) for rewards [N] in consecutive groups of `group_size`; float32.

    mean_g is the mean of the group of completion i (the G completions of one prompt). std is the standard
    deviation (Bessel-corrected, as torch.std) of the group (`scale="group"`, GRPO), of the whole batch
    (`"batch"`), or 1 with eps = 0 (`"none"`, Dr. GRPO: no scaling). Computed in float64. A group whose rewards
    are all equal (`constant_groups`) gets A = 0 exactly, never NaN: a float32 mean of eight rewards of 0.1 is not
    0.1, and divided by std + eps ~ 1e-4 its residue would become a spurious advantage. With group_size 1 every
    advantage is 0. `batch_std`, with `"batch"`, is the std of the global batch when `rewards` is one rank's share
    of it (default: std(rewards)).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards must be 1-D with a multiple of group_size={group_size} entries, found shape {list(rewards.shape)}")
    grouped = rewards.view(-1, group_size).double()
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).masked_fill(constant_groups(rewards, group_size)[:, None], 0.0)
    if scale == "none":
        return centred.view(-1).float()
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True)
    elif scale == "batch" and batch_std is not None:
        std = torch.as_tensor(batch_std, dtype=grouped.dtype, device=grouped.device)
    elif scale == "batch":  # in the rewards' dtype, as a rank's share gets it (`batch_std`): the same advantages
        std = (rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())).to(grouped.dtype)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return (centred / (std + eps)).view(-1).float()


class Surrogate(NamedTuple):
    """Per-token clipped surrogate loss [N, L] and where clipping is active (its gradient is zero)."""

    loss: Tensor
    clipped_low: Tensor  # bool [N, L]: rho < 1 - eps_low and A < 0
    clipped_high: Tensor  # bool [N, L]: rho > 1 + eps_high and A > 0
    ratio: Tensor


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None = None, eps_low: float = 0.2,
    eps_high: float = 0.2, importance_sampling_level: str = "token",
) -> Surrogate:
    """PPO's clipped surrogate per token: loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    rho = exp(log importance weight) from `IMPORTANCE_SAMPLING[importance_sampling_level]` (token: exp(logp -
    old_logp); sequence: GSPO's s_i on every token of row i); `advantages` [N] apply to every token of their row.
    The min selects the clipped term (zero gradient) exactly when rho > 1 + eps_high with A > 0 or rho < 1 -
    eps_low with A < 0 (DAPO's clip-higher uses eps_high > eps_low). Masked positions (mask False) get loss 0
    and no clip flag.
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling_level must be one of {sorted(IMPORTANCE_SAMPLING)}, got {importance_sampling_level!r}")
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
    adv = advantages.unsqueeze(1).to(logp.dtype)
    ratio = torch.exp(IMPORTANCE_SAMPLING[importance_sampling_level](logp, old_logp, mask)).expand_as(logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped) * mask
    low = (ratio < 1.0 - eps_low) & (adv < 0) & mask
    high = (ratio > 1.0 + eps_high) & (adv > 0) & mask
    return Surrogate(loss, low, high, ratio)


def sampler_importance_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling against the sampler (TIS, Yao et al. 2025; TRL's vllm_importance_sampling_cap):

        w_{i,t} = min(pi_old(o_{i,t}) / pi_sampler(o_{i,t}), C) = min(exp(old_logp - sampler_logp), C),

    detached, 0 off the mask. The rollouts were drawn from pi_sampler (another precision or engine than the policy
    pass that gives pi_old); w reweights each token's surrogate towards pi_old, and the cap C bounds its variance."""
    if not cap > 0:
        raise ValueError(f"sampler_importance_weights: cap must be > 0, got {cap!r}")
    log_ratio = (old_logp.detach() - sampler_logp.detach()).clamp(max=math.log(cap))
    return torch.where(mask.bool(), log_ratio.exp(), 0.0)


def sampler_mismatch(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """mean over the masked tokens of |log pi_old - log pi_sampler|: how far the sampler's log-probs of the sampled
    tokens are from the policy pass's (0 when both computed the same numbers)."""
    m = mask.to(old_logp.dtype)
    return ((old_logp.detach() - sampler_logp.detach()).abs() * m).sum() / m.sum().clamp(min=1.0)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token: exp(d) - d - 1, d = ref_logp - logp.

    Unbiased for tokens sampled from pi_theta, and >= 0 everywhere (e^d >= 1 + d), zero when d = 0.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss [N, L] to a scalar.

    - `grpo`: (1/N) sum_i (sum_t m x) / max(1, sum_t m): each sequence's mean, then the mean over sequences.
    - `dapo`: sum_{i,t} m x / T, T = `num_tokens` if given (pass the token count over all ranks divided by
      the world size, so that averaging gradients over ranks gives the global token mean) else max(1, sum m).
    - `dr_grpo`: sum_{i,t} m x / (N * max_completion_length) (default L), a constant normaliser.
    """
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    if loss_type == "grpo":
        return (summed.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        denominator = mask.sum().clamp(min=1.0) if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype).clamp(min=1.0)
        return summed.sum() / denominator
    if loss_type == "dr_grpo":
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        return summed.sum() / (per_token.shape[0] * length)
    raise ValueError(f"loss_type must be 'grpo', 'dapo' or 'dr_grpo', got {loss_type!r}")


@dataclass
class GRPOLossOutput:
    """The loss to minimise and what to log about it (fractions are over the masked tokens)."""

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor  # mean k3 KL per token (0 when beta == 0 and no reference is given)
    clip_low: Tensor
    clip_high: Tensor
    clip_total: Tensor
    ratio_mean: Tensor
    sampler_logp_diff: Tensor | None = None  # mean |old_logp - sampler_logp| when the sampler's log-probs are given


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_tokens: float | Tensor | None = None,
    importance_sampling_level: str = "token",
    token_weights: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    sampler_is_cap: float | None = None,
) -> GRPOLossOutput:
    """loss = aggregate(w * clipped_surrogate + beta * kl_k3), with eps_low = `epsilon`, eps_high = `epsilon_high`
    (None: `epsilon`) and the importance weight of `importance_sampling_level` ("token": GRPO, "sequence":
    GSPO). `ref_logp` is required when beta > 0 and ignored when beta == 0; the KL stays per token. w =
    `token_weights` [N, L] (detached), 1 when None. Given the sampler's log-probs of the tokens (`sampler_logp`,
    when the rollouts were drawn by another pass than old_logp's), the output reports `sampler_mismatch`, and
    `sampler_is_cap` C multiplies w by `sampler_importance_weights(old_logp, sampler_logp, mask, C)`.

    With one inner iteration (mu = 1) pass old_logp = logp.detach(): the ratio is 1 but the gradient
    A * grad logp flows; with mu > 1 pass the log-probs recorded at generation time.
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logp (log-probs under the reference model)")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    surrogate = clipped_surrogate(logp, old_logp, advantages, mask, epsilon, eps_high, importance_sampling_level)
    mask_f = mask.to(logp.dtype)
    count = mask_f.sum().clamp(min=1.0)
    sampler_diff = None
    if sampler_logp is not None:
        sampler_diff = sampler_mismatch(old_logp, sampler_logp, mask)
        if sampler_is_cap is not None:
            correction = sampler_importance_weights(old_logp, sampler_logp, mask, sampler_is_cap)
            token_weights = correction if token_weights is None else token_weights * correction
    if token_weights is not None:
        surrogate = surrogate._replace(loss=surrogate.loss * token_weights.detach().to(logp.dtype))
    per_token = surrogate.loss
    kl_mean = logp.new_zeros(())
    if beta > 0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl * mask_f
        kl_mean = (kl * mask_f).sum().detach() / count
    elif ref_logp is not None:
        kl_mean = (kl_k3(logp, ref_logp) * mask_f).sum().detach() / count
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_tokens)
    policy_loss = aggregate(surrogate.loss, mask, loss_type, max_completion_length, num_tokens).detach()
    low = surrogate.clipped_low.sum() / count
    high = surrogate.clipped_high.sum() / count
    ratio_mean = (surrogate.ratio.detach() * mask_f).sum() / count
    return GRPOLossOutput(loss, policy_loss, kl_mean, low, high, low + high, ratio_mean, sampler_diff)
