"""GRPO as a LightningModule: rollouts, rewards, group advantages and mu clipped-surrogate steps per batch.

Per batch of prompts: sample G completions each (`generate`, KV cache, stop at EOS; eval mode, LoRA adapters
merged), score them with a weighted list of TRL-style reward functions, turn rewards into group advantages,
record the old and reference log-probs without gradient (eval mode, completion positions only), then take
`num_iterations` optimiser steps on the same rollouts. The maths are the pure functions of
`aesl_lightning.maths.grpo_loss`; rollout pieces are in `aesl_lightning.modules.rollout`; FSDP helpers in `aesl_lightning.infra.fsdp`.
Each step logs where its time went under `train/time/<phase>` (seconds).
Optimisation is manual (one batch, mu optimiser steps): clip gradients with `grpo.max_grad_norm`, not
the Trainer's `gradient_clip_val`; `trainer.max_steps` counts optimiser steps.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from aesl_lightning.modules.evaluation import GenerationEval
from aesl_lightning.infra.fsdp import is_sharded, unsharded_for_generation, unwrap
from aesl_lightning.infra.generation import Generation, SamplingConfig, eos_ids, generate
from aesl_lightning.modules.grpo_config import BUILTIN_REWARDS, GRPOConfig, GRPOEvaluation  # noqa: F401  (re-exported)
from aesl_lightning.maths.grpo_loss import group_advantages, grpo_loss
from aesl_lightning.modules.lm import CausalLMModule, Scheduler
from aesl_lightning.infra.lora import LoRAConfig, adapters_disabled, is_peft_model
from aesl_lightning.infra.rng_state import ResumableRandomState
from aesl_lightning.modules.rollout import (PhaseTimer, Rollout, check_finite, completion_log_probs, disable_dropout, eval_mode,
                                    global_std, load_reward_funcs, mean_tokens_per_rank, reward_metrics, sampling_weights,
                                    score_completions, warn_missing_groups)
from aesl_lightning.modules.sample_metrics import SampleMetrics

log = logging.getLogger("aesl_lightning")

_PROMPT_KEYS = ("input_ids", "attention_mask", "prompt")


class GRPOModule(ResumableRandomState, CausalLMModule):
    """Group Relative Policy Optimization of a causal LM (typically an SFT export) with verifiable rewards.

    Args:
        name_or_path: Model to start from: a built-in name (smollm2-135m-instruct, tiny-llama,
            tiny-qwen2), a local Hugging Face directory (e.g. an SFT export), or a hub id.
        gguf_file: GGUF file inside `name_or_path` to load (dequantised on load).
        dtype: Parameter dtype when loading: float32, bfloat16, float16 or auto.
        attn_implementation: Attention kernel passed to transformers (eager, sdpa, ...); None = its default.
        gradient_checkpointing: Recompute activations in backward to save memory.
        trust_remote_code: Allow model code shipped with a hub checkpoint to run. Off unless you trust it.
        lora: LoRA adapter settings; None trains all parameters. With LoRA the reference is the
            adapter-disabled model (no second copy of the weights).
        sharded_load: Build the model on the meta device and load the weights after sharding: under FSDP2
            rank 0 alone reads them and sends each rank its shards (see `CausalLMModule`).
        grpo: Rollouts, rewards and the GRPO objective.
        evaluation: Greedy and sampled evaluation on the validation / test prompts.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to norms and biases).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimiser steps; a value below 1 is a fraction of all steps.
        scheduler: Decay after warm-up: cosine, linear or constant.
        min_lr_ratio: Final learning rate as a fraction of `lr` (cosine and linear decay).
    """

    def __init__(
        self,
        name_or_path: str = "smollm2-135m-instruct",
        gguf_file: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lora: LoRAConfig | None = None,
        sharded_load: bool = False,
        grpo: GRPOConfig = GRPOConfig(),
        evaluation: GRPOEvaluation = GRPOEvaluation(),
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.0,
        scheduler: Scheduler = "constant",
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(name_or_path=name_or_path, gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation,
                         gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code, lora=lora,
                         sharded_load=sharded_load, lr=lr,
                         weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, scheduler=scheduler, min_lr_ratio=min_lr_ratio)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.grpo, self.evaluation = grpo, evaluation
        self.reward_funcs = load_reward_funcs(grpo.reward_funcs, builtins=BUILTIN_REWARDS)
        self.reward_names = [f.__name__ for f in self.reward_funcs]
        self.reward_weights = torch.tensor(grpo.reward_weights or [1.0] * len(self.reward_funcs))
        wanted = grpo.correctness_reward or ("math_accuracy" if "math_accuracy" in self.reward_names else self.reward_names[0])
        if wanted not in self.reward_names:
            raise ValueError(f"grpo.correctness_reward {wanted!r} is not one of the reward functions {self.reward_names}")
        self.correctness_index = self.reward_names.index(wanted)
        if grpo.disable_dropout:
            disable_dropout(self.model)
        # The reference policy: none with beta 0, the adapter-disabled base under LoRA, else a frozen copy kept
        # outside the module's children (not trained or checkpointed), loaded on first use: a full copy per
        # process, or sharded like the policy with `sharded_load` under FSDP2 (see `load_frozen_start`).
        self._reference: list[torch.nn.Module] = []
        self.rollout_metrics = SampleMetrics(ks=(1, grpo.num_generations))
        self.evaluator = GenerationEval(evaluation.sampling, evaluation.max_new_tokens, greedy=evaluation.greedy,
                                        greedy_name="greedy_accuracy")
        self._eval_text: list[str] = []
        self._loaded_step = 0

    @property
    def reference_model(self) -> torch.nn.Module | None:
        """The frozen reference copy, loaded on first use (by every rank at once: a sharded load is collective);
        None with beta == 0 and under LoRA (adapters disabled instead)."""
        if self.grpo.beta <= 0 or is_peft_model(unwrap(self.model)):
            return None
        if not self._reference:
            self._reference = [self.load_frozen_start()]
        return self._reference[0]

    # ------------------------------------------------------------------------------------------- rollouts
    def sequence_log_probs(self, model, input_ids, attention_mask, completion_ids, completion_mask=None,
                           return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs [N, L] of the completion tokens at the sampling temperature, entropy [N, L] or None), 0
        outside `completion_mask`; `aesl_lightning.modules.rollout.completion_log_probs` in the model's current mode, in
        up to two length groups (less padding computed) unless the model is sharded (one forward per backward)."""
        return completion_log_probs(model, input_ids, attention_mask, completion_ids, completion_mask,
                                    self.grpo.temperature, return_entropy, max_buckets=1 if is_sharded(model) else 2)

    def score(self, prompts: list, texts: list[str], completion_ids: list[list[int]], columns: dict) -> torch.Tensor:
        """Rewards [N, num funcs] of the completions; None or NaN from a reward function becomes NaN (not
        applicable); other non-finite or non-numeric rewards raise, naming the function."""
        return score_completions(self.reward_funcs, self.reward_names, prompts, texts, completion_ids, columns)

    @torch.no_grad()
    def make_rollout(self, batch: dict, timer: PhaseTimer | None = None) -> Rollout:
        """Sample G completions per prompt, score them, compute advantages and old / reference log-probs.

        Everything here runs in eval mode (no dropout): the completions and both log-prob passes come from
        the policy being optimised, so at the first inner iteration pi_theta / pi_old = 1."""
        cfg, g = self.grpo, self.grpo.num_generations
        timer = timer or PhaseTimer(self.device)
        keep = batch["attention_mask"].any(dim=0)  # drop columns that are padding in every row
        ids, mask = batch["input_ids"][:, keep], batch["attention_mask"][:, keep]
        with timer("sampling"), eval_mode(self.model), sampling_weights(self.model):
            gen = self.sample(ids, mask, cfg.sampling)
        with timer("scoring"):
            repeat = lambda values: [v for v in values for _ in range(g)]  # noqa: E731
            columns = {k: repeat(v) for k, v in batch.items() if k not in _PROMPT_KEYS and isinstance(v, list)}
            completion_lists = [row[m].tolist() for row, m in zip(gen.completion_ids, gen.completion_mask)]
            rewards = self.score(repeat(batch["prompt"]), gen.texts, completion_lists, columns)
            warn_missing_groups(rewards, g)
            total = (rewards * self.reward_weights).nansum(dim=1).to(self.device)
            advantages = group_advantages(total, g, cfg.scale_rewards, batch_std=global_std(total) if cfg.scale_rewards == "batch" else None)
            check_finite("advantages", advantages)
        loss_mask = gen.completion_mask & ~gen.truncated.unsqueeze(1) if cfg.mask_truncated_completions else gen.completion_mask
        input_ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)
        attention_mask = torch.cat([gen.prompt_mask, gen.completion_mask.long()], dim=1)
        args = (input_ids, attention_mask, gen.completion_ids, gen.completion_mask)
        old_logp = ref_logp = None
        if cfg.num_iterations > 1:
            with timer("old_logprobs"), eval_mode(self.model):
                # the very call of the first policy pass (entropy included: the kernel may take another
                # route without it), so that pi_theta / pi_old = 1 bit for bit at the first iteration
                old_logp = self.sequence_log_probs(self.model, *args, return_entropy=True)[0]
        if cfg.beta > 0:
            with timer("ref_logprobs"), eval_mode(self.model):
                if is_peft_model(unwrap(self.model)):
                    with adapters_disabled(unwrap(self.model)):
                        ref_logp = self.sequence_log_probs(self.model, *args)[0]
                else:
                    ref_logp = self.sequence_log_probs(self.reference_model, *args)[0]
        return Rollout(gen, input_ids, attention_mask, loss_mask, advantages, rewards, old_logp, ref_logp)

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig) -> Generation:
        """One batched `generate` call (override to change how rollouts are drawn, e.g. seeded per prompt).

        No per-token entropy recorder runs inside `generate` (a float32 log-softmax over the vocabulary at every
        decoding step): the rollouts' entropies come from the first policy pass, which computes them anyway."""
        return generate(self.model, self.tokenizer, input_ids, attention_mask, sampling,
                        record_logprobs=self.grpo.records_sampler_logprobs)

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        cfg = self.grpo
        timer = PhaseTimer(self.device)
        with timer("step"):
            rollout = self.make_rollout(batch, timer)
            optimizer, schedule = self.optimizers(), self.lr_schedulers()
            num_tokens = mean_tokens_per_rank(rollout.loss_mask) if cfg.loss_type == "dapo" else None
            gen = rollout.generation
            losses = []
            for iteration in range(cfg.num_iterations):
                with timer("policy"):  # forward + backward
                    logp, entropy_map = self.sequence_log_probs(self.model, rollout.input_ids, rollout.attention_mask,
                                                                gen.completion_ids, gen.completion_mask,
                                                                return_entropy=iteration == 0)
                    old = logp.detach() if rollout.old_logp is None else rollout.old_logp
                    out = grpo_loss(logp, old, rollout.advantages, rollout.loss_mask, rollout.ref_logp, beta=cfg.beta,
                                    epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                    max_completion_length=cfg.max_new_tokens, num_tokens=num_tokens,
                                    importance_sampling_level=cfg.importance_sampling_level,
                                    sampler_logp=gen.sampler_logp, sampler_is_cap=cfg.sampler_is_cap)
                    if iteration == 0:  # the policy's entropy at the sampled positions (sampling temperature)
                        gen.entropy = entropy_map.detach().masked_fill(~gen.completion_mask, 0.0)
                        entropy = gen.entropy.sum() / gen.completion_mask.sum().clamp(min=1)
                    check_finite("loss", out.loss.detach())
                    optimizer.zero_grad()
                    self.manual_backward(out.loss)
                with timer("optimizer"):
                    if cfg.max_grad_norm is not None:
                        self.configure_gradient_clipping(optimizer, cfg.max_grad_norm, "norm")  # FSDP1-aware
                    optimizer.step()
                    schedule.step()
                losses.append(out.loss.detach())
        self._log_training(rollout, out, torch.stack(losses).mean(), entropy)
        self.log_dict({f"train/time/{phase}": torch.tensor(s) for phase, s in timer.seconds.items()},
                      batch_size=len(gen.texts))
        return torch.stack(losses).mean()

    def _log_training(self, rollout: Rollout, out, loss: torch.Tensor, entropy: torch.Tensor) -> None:
        gen, rewards, n = rollout.generation, rollout.rewards, rollout.rewards.shape[0]
        correct = rewards[:, self.correctness_index]
        scores = [None if math.isnan(s) else s for s in correct.tolist()]
        self.rollout_metrics.update(gen, self.grpo.num_generations, eos_ids(self.model, self.tokenizer), scores)
        values = {f"train/{k}": v for k, v in self.rollout_metrics.compute().items()}
        self.rollout_metrics.reset()
        values.update({"train/loss": loss, "train/policy_loss": out.policy_loss, "train/kl": out.kl,
                       "train/clip_ratio/low": out.clip_low, "train/clip_ratio/high": out.clip_high,
                       "train/clip_ratio/total": out.clip_total, "train/entropy": entropy,
                       "train/accuracy": (correct[~correct.isnan()] >= 1).float().mean(),
                       "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"])})
        values.update(reward_metrics(rewards, self.reward_weights, self.reward_names, self.grpo.num_generations))
        if out.sampler_logp_diff is not None:
            values["train/sampler_logp_diff"] = out.sampler_logp_diff
        self.log_dict({k: v.float() for k, v in values.items()}, batch_size=n)
        every = self.grpo.log_completions_every_n_steps
        batch_idx = self.trainer.fit_loop.epoch_loop.batch_progress.total.completed
        if every and batch_idx % every == 0 and self.global_rank == 0:
            rows = range(min(self.grpo.num_completions_to_print, n))
            blocks = [f"**completion {i}** (rewards {dict(zip(self.reward_names, rewards[i].tolist()))}, "
                      f"advantage {rollout.advantages[i].item():.3f}): {gen.texts[i]}" for i in rows]
            self._add_text("train/completions", "\n\n---\n\n".join(blocks))

    def _add_text(self, tag: str, text: str) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if text and experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, global_step=self.global_step)

    # -------------------------------------------------------------------------------- validation and test
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self.evaluate_batch(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict) -> None:
        """Greedy accuracy and n samples per prompt (accuracy, pass@k, diversity) on one batch of prompts: the
        shared `aesl_lightning.modules.evaluation.GenerationEval`, with the weights gathered once under FSDP."""
        with unsharded_for_generation(self.model):
            result = self.evaluator.update(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                                           batch["prompt"], batch["answer"])
        self._eval_text += result.text_blocks(self.evaluation.num_text_samples - len(self._eval_text))

    def _finish_evaluation(self, stage: str) -> dict[str, float]:
        values = self.evaluator.compute(prefix=f"{stage}/", device=self.device)  # every rank: a collective
        self.evaluator.reset()
        if values:
            self.log_dict(values)  # torchmetrics already synced the sums over ranks
        self._add_text(f"{stage}/samples", "\n\n---\n\n".join(self._eval_text))
        self._eval_text = []
        return {k: float(v) for k, v in values.items()}

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        results = self._finish_evaluation("test")
        if self.global_rank == 0 and results:
            folder = Path(getattr(self.logger, "log_dir", None) or self.trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            # `test --ckpt_path` restores the weights but not the trainer's step: take the checkpoint's
            step = self.global_step or self._loaded_step
            ckpt = self.trainer.ckpt_path
            record = {"step": step, "checkpoint": str(ckpt) if ckpt else None, **results}
            (folder / "test_results.json").write_text(json.dumps(record, indent=2))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the random states (rollouts resume where they stood)
        self._loaded_step = int(checkpoint.get("global_step", 0))
