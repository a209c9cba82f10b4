"""Cold-start SFT as a LightningModule: a causal LM trained with CE, DFT or the Adaptive Early-Stop Loss.

The losses are pure functions in `aesl_lightning.maths.losses`; this module only wires them: forward, log,
optimise. Every step logs the loss, the learning rate, token accuracy and the mean predictive entropy on
completion tokens (from the logits already in memory), and the AESL gate statistics.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

from aesl_lightning.infra.fsdp import is_sharded, unsharded_for_generation, unwrap
from aesl_lightning.modules.evaluation import GenerationEval, ValidationGeneration
from aesl_lightning.metrics import KLToBase
from aesl_lightning.modules.lm import CausalLMModule, Scheduler
from aesl_lightning.infra.lora import LoRAConfig
from aesl_lightning.maths.losses import BaseStates, LossConfig, LossOutput, chunked_sft_loss, sft_loss

log = logging.getLogger("aesl_lightning")


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
        sharded_load: Build the model on the meta device and load the weights after sharding: under FSDP2
            rank 0 alone reads them and sends each rank its shards (see `CausalLMModule`).
        loss: The SFT objective (ce, dft or aesl) and its knobs.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to norms and biases).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimiser steps; a value below 1 is a fraction of all steps.
        scheduler: Decay after warm-up: cosine, linear or constant.
        min_lr_ratio: Final learning rate as a fraction of `lr` (cosine and linear decay).
        val_generation: Generation on held-out prompts at validation: greedy answer accuracy (symbolic
            match of the final \\boxed{} answer, via math-verify) and diversity of k samples per prompt.
        histogram_every_n_steps: Log a histogram of p_t (the model's probability of each target token) to
            TensorBoard every this many steps; 0 disables it.
        gate_check_batches: Training batches on which the starting model's statistics are measured when training
            starts: they resolve quantile thresholds and the share of tokens the gates keep is checked (a warning
            under 5%); 0 skips the check (quantile thresholds then use 8 batches).
        update_norm_every_n_steps: Log the norm of each optimiser step's parameter update (train/update_norm)
            every this many steps; 0 disables it (it keeps a copy of the trainable parameters for the step).
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
        loss: LossConfig = LossConfig(),
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.1,
        scheduler: Scheduler = "cosine",
        min_lr_ratio: float = 0.1,
        val_generation: ValidationGeneration = ValidationGeneration(),
        histogram_every_n_steps: int = 50,
        gate_check_batches: int = 8,
        update_norm_every_n_steps: int = 1,
    ) -> None:
        super().__init__(
            name_or_path=name_or_path,
            gguf_file=gguf_file,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            lora=lora,
            sharded_load=sharded_load,
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
        self.evaluator = GenerationEval(val_generation.sampling, val_generation.max_new_tokens, greedy_name="answer_accuracy")
        self.kl_to_base = KLToBase()
        self._base_model = None  # frozen copy of the starting weights, built on first use
        self._validations = 0
        self._step_tokens = 0  # completion tokens of the optimiser step so far (this rank)
        self._gates_checked = False
        self._update_norm: torch.Tensor | None = None
        self._before_step: tuple[list, list] | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of the wrapped causal LM."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, batch: dict, config: LossConfig | None = None, num_tokens: float | None = None) -> LossOutput:
        """The configured SFT loss (or `config`) on a batch; with `loss.chunk_size` set, from hidden states chunk by
        chunk so that the [tokens x vocab] logits never exist. `num_tokens` is the normaliser (default: local count)."""
        config = config or self.loss_config
        base = self.base_states(batch) if config.spec.anchor == "base" else None
        if config.chunk_size is None:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
            return sft_loss(logits, batch["labels"], config, return_entropy=True, num_tokens=num_tokens, base=base)
        if is_sharded(self.model):
            # the decoder alone would skip the root unit's all-gather of the embeddings and the LM head
            raise ValueError("model.loss.chunk_size is not supported under FSDP sharding yet; set it to null")
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        _check_plain_head(lm)
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        head = lm.get_output_embeddings()
        return chunked_sft_loss(hidden, head.weight, batch["labels"], config, lm_head_bias=head.bias, return_entropy=True,
                                num_tokens=num_tokens, base=base)

    @torch.no_grad()
    def base_states(self, batch: dict) -> BaseStates:
        """The starting model's final hidden states and LM head on `batch`, for base-anchored losses: the
        adapter-disabled model under LoRA (no second copy), else the frozen copy of the starting weights."""
        from aesl_lightning.infra.lora import adapters_disabled, is_peft_model

        model = unwrap(self.model)
        if is_sharded(self.model) and is_peft_model(model):
            raise ValueError(f"model.loss.name={self.loss_config.name!r} (anchored to the base) is not supported with LoRA "
                             "under FSDP yet: train without sharding, or fully fine-tune (the base is then a frozen copy)")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
        if is_peft_model(model):
            with adapters_disabled(model):
                lm = model.get_base_model()
                hidden = lm.get_decoder()(**inputs).last_hidden_state
        else:
            lm = self._frozen_base()
            hidden = lm.get_decoder()(**inputs).last_hidden_state
        head = lm.get_output_embeddings()
        return BaseStates(hidden, head.weight, head.bias)

    def _frozen_base(self) -> torch.nn.Module:
        if self._base_model is None:
            # kept outside the module's children: not trained, not checkpointed (sharded with sharded_load under FSDP2)
            self._base_model = [self.load_frozen_start()]
        return self._base_model[0]

    def _log_loss(self, out: LossOutput, batch: dict, stage: str, loss: torch.Tensor) -> None:
        sync = stage != "train"  # epoch-level validation numbers are averaged over ranks; step-level are not
        stats = out.gate_stats()
        tokens = stats.pop("completion_tokens")
        # Each value is a mean over this batch's completion tokens; weighted by their count, Lightning's epoch mean is
        # sum(mean x count) / sum(count) over batches (and ranks: with sync_dist it reduces both sums), i.e. the mean
        # over every validation token, whatever the batches' lengths. (Training values are logged per step.)
        weight = int(tokens)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, batch_size=weight, sync_dist=sync)
        self.log_dict({f"{stage}/{k}": v for k, v in stats.items()}, batch_size=weight, sync_dist=sync)
        self.log(f"{stage}/completion_tokens", tokens.float(), batch_size=1, reduce_fx="sum", sync_dist=sync)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # The sum over this micro-batch's tokens; `on_before_optimizer_step` divides the accumulated gradient by the
        # completion tokens of the whole optimiser step over all ranks, so L = sum m w l / N exactly as specified.
        out = self.compute_loss(batch, num_tokens=1)
        count = int(out.mask.sum())
        self._step_tokens += count
        self._log_loss(out, batch, "train", out.loss_sum / max(count, 1))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch["input_ids"].shape[0])
        every = self.hparams.histogram_every_n_steps
        if every and self.global_step % every == 0:
            self._log_histogram("train/p_t", out.token_logprob[out.mask].exp())
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Rescale the accumulated gradient from sum-per-micro-batch to sum over the step's N completion tokens."""
        tokens = torch.tensor(float(self._step_tokens), device=self.device, dtype=torch.float64)
        self._step_tokens = 0
        world = self._data_parallel_size()
        if world > 1:
            dist.all_reduce(tokens)
        # Lightning divided each micro-batch loss by accumulate_grad_batches and the strategy averages over ranks
        factor = float(self.trainer.accumulate_grad_batches * world / tokens.clamp(min=1))
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
        self._snapshot_for_update_norm()  # the weights as the optimiser is about to change them

    def _data_parallel_size(self) -> int:
        if self.device_mesh is not None:
            return self.device_mesh["data_parallel"].size()
        return self.trainer.world_size if dist.is_available() and dist.is_initialized() else 1

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # closure -> on_before_optimizer_step -> step
        if self._before_step is not None:
            params, before = self._before_step
            self._before_step = None
            with torch.no_grad():
                squares = torch.zeros((), dtype=torch.float64, device=self.device)
                for p, b in zip(params, before):
                    squares += (_local(p).double() - b.double()).pow(2).sum()
            if is_sharded(self.model) and dist.is_available() and dist.is_initialized():
                dist.all_reduce(squares)
            self._update_norm = squares.sqrt().float()

    def _snapshot_for_update_norm(self) -> None:
        every = self.hparams.update_norm_every_n_steps
        if every and self.global_step % every == 0:
            params = [p for p in self.parameters() if p.requires_grad]
            with torch.no_grad():
                self._before_step = (params, [_local(p).detach().clone() for p in params])

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._update_norm is not None:
            self.log("train/update_norm", self._update_norm, batch_size=1)
            self._update_norm = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # validation needs no gradient, so the full logits are affordable even when training uses chunks
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        base = self.base_states(batch) if self.loss_config.spec.anchor == "base" else None
        out = sft_loss(logits, batch["labels"], self.loss_config, return_entropy=True, base=base)
        self._log_loss(out, batch, "val", out.loss)
        if self.val_generation.kl_to_base and not self.trainer.sanity_checking:
            self.kl_to_base.update(logits[:, :-1], self._base_logits(batch)[:, :-1], out.mask)
            self.log("val/kl_to_base", self.kl_to_base, batch_size=batch["input_ids"].shape[0])

    def _base_logits(self, batch: dict) -> torch.Tensor:
        """Logits of the starting model: the adapter-disabled model under LoRA, else a frozen copy loaded once
        from `name_or_path` (never the current weights, so a resumed run still compares with the start)."""
        from aesl_lightning.infra.lora import adapters_disabled, is_peft_model

        if is_peft_model(unwrap(self.model)):
            with adapters_disabled(unwrap(self.model)):
                return self(batch["input_ids"], batch.get("attention_mask"))
        return self._frozen_base()(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).logits

    # ------------------------------------------------------------------------------ gates at step 0
    def on_train_start(self) -> None:
        """Measure the starting model on the first training batches: resolve quantile thresholds, check the gates."""
        from itertools import islice

        from aesl_lightning.modules.calibration import MIN_LEARNED_SHARE, calibrate

        cfg = self.loss_config
        wants_quantiles = cfg.tau_tok_quantile is not None or cfg.tau_seq_quantile is not None
        batches = self.hparams.gate_check_batches or (8 if wants_quantiles else 0)
        if self._gates_checked or not batches:
            return
        self._gates_checked = True
        loader = self.trainer.train_dataloader
        resolved, share, total = calibrate(self, islice(iter(loader), batches), cfg)
        if wants_quantiles:
            log.info("loss thresholds from the starting model's quantiles: tau_tok %.4f, tau_seq %.4f", resolved.tau_tok, resolved.tau_seq)
            self.loss_config = resolved
        # written and flushed now, at step 0: `self.log` from this hook reaches the loggers only at the epoch's end,
        # and a run killed before then would lose it
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics({"train/learned_share_step0": float(share)}, step=0)
                logger.save()
        if share < MIN_LEARNED_SHARE and cfg.name != "ce":
            log.warning("!!! loss %r keeps only %.1f%% of %d completion tokens at step 0 (weight > 0.5): its gates leave almost "
                        "nothing to learn. Raise tau_tok / tau_seq, use rho > 0, or set thresholds by quantile "
                        "(model.loss.tau_tok_quantile). See python -m aesl_lightning.calibrate.", cfg.name, 100 * share, total)
        else:
            log.info("loss %r learns %.1f%% of %d completion tokens at step 0", cfg.name, 100 * share, total)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # thresholds resolved from quantiles at the start are part of the run: a resumed run must not re-resolve them
        checkpoint["aesl_lightning"]["loss"] = asdict(self.loss_config)
        checkpoint["aesl_lightning"]["gates_checked"] = self._gates_checked

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("aesl_lightning", {})
        if "loss" in meta:
            self.loss_config = LossConfig(**meta["loss"])
            self._gates_checked = bool(meta.get("gates_checked", True))

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
        self.seeded_generation(datamodule.val_prompts_dataloader(cfg.batch_size))

    def seeded_generation(self, loader) -> dict[str, float]:
        """`generate_on_validation_prompts` with sampling seeded from (seed, step, rank) and the global RNG left as it
        was: a resumed run samples, measures and decides exactly as the uninterrupted one."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed * 1_000_003 + self.global_step * 7_919 + self.global_rank) % (2**63))
            return self.generate_on_validation_prompts(loader)

    def generate_on_validation_prompts(self, loader) -> dict[str, float]:
        """Generate for the first `val_generation.num_prompts` prompts of `loader` (split over ranks).

        Greedy completions give `val/answer_accuracy` (the final answer checked symbolically) and
        `val/greedy_length`; with `num_samples >= 2`, k samples per prompt give `val/gen_entropy`, `val/self_bleu`,
        `val/distinct_2`, `val/distinct_answers`, `val/gen_length`, `val/gen_truncated`, `val/sample_accuracy`,
        `val/pass@1` and `val/pass@k`. Also a TensorBoard text panel. Returns the logged values.
        """
        started = time.perf_counter()
        cfg = self.val_generation
        rank, world = self.global_rank, self.trainer.world_size
        shown: list[str] = []
        seen = 0
        # every rank enters (unsharding is collective); inside, ranks may generate different lengths or nothing.
        # Lightning autocasts only around the *_step hooks; this runs after the epoch, so it enters the precision's own
        # forward context (under bf16-mixed, sampling runs in bf16 autocast like every other forward of the run).
        precision = getattr(self.trainer, "precision_plugin", None)  # None: called with a stand-in trainer, outside a fit
        with unsharded_for_generation(self.model), (precision.forward_context() if precision is not None else nullcontext()):
            for batch in loader:
                if seen >= cfg.num_prompts:
                    break
                take = min(len(batch["prompt"]), cfg.num_prompts - seen)
                rows = [i for i in range(take) if (seen + i) % world == rank]
                seen += take
                record = bool(rows)
                if not record:
                    if not is_sharded(self.model):
                        continue
                    rows = [0]  # generate() syncs FSDP ranks per token: generate a stand-in, count nothing
                result = self.evaluator.update(self.model, self.tokenizer, batch["input_ids"][rows].to(self.device),
                                               batch["attention_mask"][rows].to(self.device), [batch["prompt"][i] for i in rows],
                                               [batch["answer"][i] for i in rows], record=record)
                shown += result.text_blocks(cfg.num_text_samples - len(shown))
        values = self.evaluator.compute(prefix="val/", device=self.device)  # every rank: a collective
        # wall time of this rank's generation: the price of the diversity signal, to weigh against training
        values["val/generation_seconds"] = torch.tensor(time.perf_counter() - started)
        self.evaluator.reset()
        self.log_dict(values)  # torchmetrics already synced the sums over ranks
        experiment = getattr(self.logger, "experiment", None)
        if shown and experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("val/samples", "\n\n---\n\n".join(shown), global_step=self.global_step)
        return {k: float(v) for k, v in values.items()}


def _check_plain_head(lm: torch.nn.Module) -> None:
    """The chunked loss computes hidden @ W.T + b itself: refuse models whose forward does more than that."""
    config = lm.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"model.loss.chunk_size: {type(lm).__name__} applies config.{name}={getattr(config, name)} to its "
                             "logits, which the chunked loss (hidden @ W.T + b) would skip; set chunk_size to null")
    head = lm.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        raise ValueError(f"model.loss.chunk_size: the LM head is {type(head).__name__} (adapted or not a plain Linear), which the "
                         "chunked loss cannot reproduce; set chunk_size to null")


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (FSDP2), else the parameter itself."""
    return param.to_local() if hasattr(param, "to_local") else param
