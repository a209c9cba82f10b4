"""Cold-start SFT as a LightningModule: a causal LM trained with CE, DFT or the Adaptive Early-Stop Loss.

The losses are pure functions in `aesl_lightning.losses`; this module only wires them: forward, log,
optimise. Every step logs the loss, the learning rate, token accuracy and the mean predictive entropy on
completion tokens (from the logits already in memory), and the AESL gate statistics.
"""

from __future__ import annotations

import torch

from aesl_lightning.lm import CausalLMModule, Scheduler
from aesl_lightning.lora import LoRAConfig
from aesl_lightning.losses import LossConfig, LossOutput, chunked_sft_loss, sft_loss


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
