"""GRPO's configuration: the rollouts and objective (`GRPOConfig`) and the evaluation (`GRPOEvaluation`).

Beside `aesl_lightning.modules.grpo` (the LightningModule), as TRL keeps its trainer and its config side by side.
Checkpoints written before this split name these classes `aesl_lightning.grpo.*`; `aesl_lightning.modules.grpo`
re-exports them and `aesl_lightning.modules.checkpoint_load` allows those names under `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aesl_lightning.infra.generation import SamplingConfig
from aesl_lightning.maths.grpo_loss import IMPORTANCE_SAMPLING, LossType, ScaleRewards

__all__ = ["BUILTIN_REWARDS", "GRPOConfig", "GRPOEvaluation"]

BUILTIN_REWARDS = ["aesl_lightning.scoring.rewards.math_accuracy", "aesl_lightning.scoring.rewards.boxed_format"]


@dataclass
class GRPOConfig:
    """GRPO rollouts and objective (names as in TRL's GRPOConfig where one exists).

    Args:
        num_generations: Completions sampled per prompt (G), the group of the advantages.
        temperature: Sampling temperature of the rollouts (log-probs use the same temperature).
        top_p: Nucleus mass of the rollouts; 1.0 disables it.
        max_new_tokens: Longest completion in tokens; longer ones are cut and counted as truncated.
        beta: Weight of the k3 KL to the frozen reference; 0 loads no reference at all.
        epsilon: Lower clip range: the ratio is clipped below at 1 - epsilon.
        epsilon_high: Upper clip range (1 + epsilon_high; DAPO's clip-higher uses 0.28); None = epsilon.
        loss_type: Aggregation: grpo (sequence means, then mean), dapo (token mean), dr_grpo (sum / (N x max_new_tokens)).
        scale_rewards: Advantage scale: group std, batch std, or none (Dr. GRPO).
        importance_sampling_level: The ratio pi_theta / pi_old: "token" (GRPO) or "sequence" (GSPO's
            length-normalised sequence ratio; use its small clip ranges, e.g. epsilon 3e-4, epsilon_high 4e-4),
            or any name added with `aesl_lightning.maths.grpo_loss.register_importance_sampling`.
        num_iterations: Optimiser steps per batch of rollouts (mu); > 1 uses the generation-time log-probs.
        reward_funcs: Reward functions by import path (`package.module.function`), TRL's signature.
        reward_weights: One weight per reward function; None weighs each 1.0.
        correctness_reward: Name of the reward function whose value >= 1 counts as correct (accuracy,
            pass@k); None: math_accuracy if listed, else the first.
        mask_truncated_completions: Leave completions that hit max_new_tokens out of the loss (DAPO).
        max_grad_norm: Clip the gradient norm to this before each optimiser step; None: no clipping.
        log_completions_every_n_steps: Show a few rollouts with their rewards in TensorBoard's text panel
            every this many batches; 0 disables it.
        num_completions_to_print: Rollouts shown in the text panel.
        disable_dropout: Switch off every dropout of the policy (LoRA's included) for training too, as TRL's
            `disable_dropout`. Rollouts and their old / reference log-probs never use dropout either way.
        log_sampler_mismatch: Record the sampler's log-probs of the sampled tokens while generating (one float32
            log-softmax per decoding step) and log train/sampler_logp_diff, the mean |log pi_sampler - log pi_old|:
            how far sampling (another precision, merged adapters, another engine) is from the policy pass.
        sampler_is_cap: Truncated importance sampling against the sampler (as TRL's vllm_importance_sampling_cap):
            each token's surrogate is weighted by min(pi_old / pi_sampler, cap), e.g. 2.0; None (default) disables
            it. Records the sampler's log-probs as log_sampler_mismatch does.
    """

    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: LossType = "grpo"
    scale_rewards: ScaleRewards = "group"
    importance_sampling_level: str = "token"
    num_iterations: int = 1
    reward_funcs: list[str] = field(default_factory=lambda: list(BUILTIN_REWARDS))
    reward_weights: list[float] | None = None
    correctness_reward: str | None = None
    mask_truncated_completions: bool = False
    max_grad_norm: float | None = 1.0
    log_completions_every_n_steps: int = 10
    num_completions_to_print: int = 4
    disable_dropout: bool = True
    log_sampler_mismatch: bool = False
    sampler_is_cap: float | None = None

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (advantages compare completions of a prompt), got {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"grpo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high or 0) < 0:
            raise ValueError("grpo.beta, grpo.epsilon and grpo.epsilon_high must be >= 0")
        if self.sampler_is_cap is not None and not self.sampler_is_cap > 0:
            raise ValueError(f"grpo.sampler_is_cap must be None or > 0, got {self.sampler_is_cap!r}")
        if self.reward_weights is not None and not all(math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"grpo.reward_weights must be finite numbers, got {self.reward_weights}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"grpo.reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING:
            raise ValueError(f"grpo.importance_sampling_level must be one of {sorted(IMPORTANCE_SAMPLING)}, got "
                             f"{self.importance_sampling_level!r}")
        self.sampling  # validates temperature, top_p, max_new_tokens

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.num_generations, self.temperature, self.top_p, self.max_new_tokens)

    @property
    def records_sampler_logprobs(self) -> bool:
        return self.log_sampler_mismatch or self.sampler_is_cap is not None


@dataclass
class GRPOEvaluation:
    """Validation / test on held-out prompts: greedy answer accuracy and n samples per prompt.

    Args:
        num_samples: Samples per prompt (n): pass@1 is their mean accuracy, pass@n the unbiased estimate; 0 = none.
        temperature: Sampling temperature of the n samples.
        top_p: Nucleus mass of the n samples.
        max_new_tokens: Longest completion in tokens (greedy and sampled).
        greedy: Also decode greedily and log greedy_accuracy.
        num_text_samples: Prompts shown in TensorBoard's text panel.
    """

    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = True
    num_text_samples: int = 3

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.num_text_samples < 0 or self.max_new_tokens < 1:
            raise ValueError("evaluation.num_samples and num_text_samples must be >= 0 and max_new_tokens >= 1, got "
                             f"{self.num_samples}, {self.num_text_samples}, {self.max_new_tokens}")

    @property
    def sampling(self) -> SamplingConfig | None:
        """How the n samples are drawn; None with num_samples 0."""
        if self.num_samples == 0:
            return None
        return SamplingConfig(self.num_samples, self.temperature, self.top_p, self.max_new_tokens)
