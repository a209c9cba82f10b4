"""Cold-start SFT as a LightningModule: a causal LM trained with CE, DFT or the Adaptive Early-Stop Loss.

The losses are pure functions in `aesl_lightning.losses`; this module only wires them: forward, log,
optimise. Every step logs the loss, the learning rate, token accuracy and the mean predictive entropy on
completion tokens (from the logits already in memory), and the AESL gate statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torchmetrics import MeanMetric

from aesl_lightning.generation import SamplingConfig, generate
from aesl_lightning.lm import CausalLMModule, Scheduler
from aesl_lightning.lora import LoRAConfig
from aesl_lightning.losses import LossConfig, LossOutput, chunked_sft_loss, sft_loss

log = logging.getLogger("aesl_lightning")


@dataclass
class ValidationGeneration:
    """Generation on held-out prompts at validation time (the "SFT score" and, later, diversity).

    Args:
        num_prompts: Held-out prompts to generate for at each validation; 0 turns generation off.
        max_new_tokens: Longest greedy completion in tokens.
        batch_size: Prompts per `generate` call.
        every_n_validations: Generate at every n-th validation only (generation is the slow part).
        num_text_samples: Prompts whose completions are shown in TensorBoard's text panel.
    """

    num_prompts: int = 32
    max_new_tokens: int = 192
    batch_size: int = 32
    every_n_validations: int = 1
    num_text_samples: int = 3

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_text_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"val_generation.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_new_tokens", "batch_size", "every_n_validations"):
            if getattr(self, name) < 1:
                raise ValueError(f"val_generation.{name} must be >= 1, got {getattr(self, name)}")


# Hyper-parameters hold these config objects; allow them in `torch.load(weights_only=True)` (Lightning's
# default when resuming) so checkpoints stay loadable without trusting arbitrary pickles.
torch.serialization.add_safe_globals([LossConfig, LoRAConfig, ValidationGeneration, SamplingConfig])


class SFTModule(CausalLMModule):
    """Supervised fine-tuning of a causal LM on completion tokens (the RL cold-start stage).

    Args:
        name_or_path: Model to start from: a built-in name (smollm2-135m-instruct, tiny-llama,
            tiny-qwen2), a local Hugging Face directory, or a hub id.
        gguf_file: GGUF file inside `name_or_path` to load (dequantised on load).
        dtype: Parameter dtype when loading: float32, bfloat16, float16 or auto.
        attn_implementation: Attention kernel passed to transformers (eager, sdpa, ...); None = its default.
        gradient_checkpointing: Recompute activations in backward to save memory.
        trust_remote_code: Allow model code shipped with a hub checkpoint to run. Off unless you trust it.
        lora: LoRA adapter settings; None trains all parameters.
        loss: The SFT objective (ce, dft or aesl) and its knobs.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to norms and biases).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimiser steps; a value below 1 is a fraction of all steps.
        scheduler: Decay after warm-up: cosine, linear or constant.
        min_lr_ratio: Final learning rate as a fraction of `lr` (cosine and linear decay).
        val_generation: Greedy generation on held-out prompts at validation: answer accuracy (exact
            symbolic match of the final \\boxed{} answer, via math-verify).
        histogram_every_n_steps: Log a histogram of p_t (the model's probability of each target token) to
            TensorBoard every this many steps; 0 disables it.
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
        loss: LossConfig = LossConfig(),
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.1,
        scheduler: Scheduler = "cosine",
        min_lr_ratio: float = 0.1,
        val_generation: ValidationGeneration = ValidationGeneration(),
        histogram_every_n_steps: int = 50,
    ) -> None:
        super().__init__(
            name_or_path=name_or_path,
            gguf_file=gguf_file,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            lora=lora,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            warmup_steps=warmup_steps,
            scheduler=scheduler,
            min_lr_ratio=min_lr_ratio,
        )
        self.save_hyperparameters()
        self.loss_config = loss
        self.val_generation = val_generation
        self.answer_accuracy = MeanMetric()
        self.greedy_length = MeanMetric()
        self.greedy_truncated = MeanMetric()
        self._validations = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of the wrapped causal LM."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, batch: dict) -> LossOutput:
        """The configured SFT loss on a batch; with `loss.chunk_size` set, from hidden states chunk by chunk
        so that the [tokens x vocab] logits never exist."""
        if self.loss_config.chunk_size is None:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
            return sft_loss(logits, batch["labels"], self.loss_config, return_entropy=True)
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        head = lm.get_output_embeddings()
        return chunked_sft_loss(
            hidden, head.weight, batch["labels"], self.loss_config, lm_head_bias=head.bias, return_entropy=True
        )

    def _shared_step(self, batch: dict, stage: str) -> LossOutput:
        out = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        sync = stage != "train"  # epoch-level validation numbers are averaged over ranks; step-level are not
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, batch_size=batch_size, sync_dist=sync)
        stats = out.gate_stats()
        tokens = stats.pop("completion_tokens")
        self.log_dict({f"{stage}/{k}": v for k, v in stats.items()}, batch_size=batch_size, sync_dist=sync)
        self.log(f"{stage}/completion_tokens", tokens.float(), batch_size=1, reduce_fx="sum", sync_dist=sync)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._shared_step(batch, "train")
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch["input_ids"].shape[0])
        every = self.hparams.histogram_every_n_steps
        if every and self.global_step % every == 0:
            self._log_histogram("train/p_t", out.token_logprob[out.mask].exp())
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def _log_histogram(self, tag: str, values: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_histogram") and values.numel() > 0:
            experiment.add_histogram(tag, values.detach().float().cpu(), global_step=self.global_step)

    # ------------------------------------------------------------------------------ generation at validation
    def on_validation_epoch_end(self) -> None:
        cfg = self.val_generation
        if self.trainer.sanity_checking or cfg.num_prompts == 0:
            return
        self._validations += 1
        if (self._validations - 1) % cfg.every_n_validations:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_prompts_dataloader"):
            log.warning("val_generation is on but the datamodule has no val_prompts_dataloader(); skipped")
            return
        self.generate_on_validation_prompts(datamodule.val_prompts_dataloader(cfg.batch_size))

    def generate_on_validation_prompts(self, loader) -> dict[str, float]:
        """Greedy completions for the first `val_generation.num_prompts` prompts of `loader` (split over
        ranks), scored with the math checker; logs `val/answer_accuracy`, `val/greedy_length` and
        `val/greedy_truncated`, and a text panel. Returns the logged values."""
        from aesl_lightning.rewards import math_accuracy

        cfg = self.val_generation
        rank, world = self.global_rank, self.trainer.world_size
        greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        shown: list[str] = []
        seen = 0
        for batch in loader:
            if seen >= cfg.num_prompts:
                break
            take = min(len(batch["prompt"]), cfg.num_prompts - seen)
            rows = [i for i in range(take) if (seen + i) % world == rank]
            seen += take
            if not rows:
                continue
            ids = batch["input_ids"][rows].to(self.device)
            mask = batch["attention_mask"][rows].to(self.device)
            keep = mask.any(dim=0)  # drop columns that are padding in every kept row
            out = generate(self.model, self.tokenizer, ids[:, keep], mask[:, keep], greedy)
            answers = [batch["answer"][i] for i in rows]
            prompts = [batch["prompt"][i] for i in rows]
            scores = math_accuracy(prompts, out.texts, answer=answers)
            for score, length, truncated in zip(scores, out.lengths.tolist(), out.truncated.tolist()):
                if score is not None:
                    self.answer_accuracy.update(score)
                self.greedy_length.update(float(length))
                self.greedy_truncated.update(float(truncated))
            for prompt, text, answer, score in zip(prompts, out.texts, answers, scores):
                if len(shown) < cfg.num_text_samples:
                    shown.append(f"**prompt**: {prompt}\n\n**completion**: {text}\n\n**answer**: {answer} (score {score})")
        values = {
            "val/answer_accuracy": self.answer_accuracy.compute(),
            "val/greedy_length": self.greedy_length.compute(),
            "val/greedy_truncated": self.greedy_truncated.compute(),
        }
        for metric in (self.answer_accuracy, self.greedy_length, self.greedy_truncated):
            metric.reset()
        self.log_dict(values)  # torchmetrics already synced the sums over ranks
        experiment = getattr(self.logger, "experiment", None)
        if shown and experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("val/greedy_samples", "\n\n---\n\n".join(shown), global_step=self.global_step)
        return {k: float(v) for k, v in values.items()}
