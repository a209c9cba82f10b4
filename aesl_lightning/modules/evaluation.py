"""Generation-based evaluation shared by SFT validation and GRPO validation / test.

For a batch of left-padded prompts with ground-truth answers: greedy decoding (answer accuracy of the final
answer, checked symbolically, and length) and k samples per prompt (accuracy, pass@1 / pass@k, the sampling
model's entropy at its own tokens, self-BLEU, distinct-2, distinct final answers, length, truncation). Metrics are
torchmetrics whose states are sums and counts, so values synced over ranks are exact, and `compute` is entered by
every rank whether or not it saw data (a collective that only some ranks enter would hang).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import MeanMetric

from aesl_lightning.infra.distributed import any_rank
from aesl_lightning.infra.generation import SamplingConfig, eos_ids, generate
from aesl_lightning.modules.sample_metrics import SampleMetrics


@dataclass
class ValidationGeneration:
    """Generation on held-out prompts at validation: the "SFT score" and the diversity of the model's samples.

    Args:
        num_prompts: Held-out prompts to generate for at each validation; 0 turns generation off.
        max_new_tokens: Longest completion in tokens (greedy and sampled).
        num_samples: Completions sampled per prompt (k) for entropy, self-BLEU, distinct-2 and pass@k;
            below 2 turns sampling off (greedy answer accuracy only).
        temperature: Sampling temperature of the k samples.
        top_p: Nucleus mass of the k samples; 1.0 disables it.
        batch_size: Prompts per `generate` call (the call samples batch_size x num_samples sequences).
        every_n_validations: Generate at every n-th validation only (generation is the slow part).
        num_text_samples: Prompts whose completions are shown in TensorBoard's text panel.
        kl_to_base: Also log KL(p_theta || p_base) on the reference completions (distributional forgetting);
            keeps a frozen copy of the starting model (or disables the LoRA adapters) for it.
    """

    num_prompts: int = 32
    max_new_tokens: int = 192
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    every_n_validations: int = 1
    num_text_samples: int = 3
    kl_to_base: bool = True

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_text_samples", "num_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"val_generation.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_new_tokens", "batch_size", "every_n_validations"):
            if getattr(self, name) < 1:
                raise ValueError(f"val_generation.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"val_generation.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"val_generation.top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> SamplingConfig | None:
        if self.num_samples < 2:
            return None
        return SamplingConfig(self.num_samples, self.temperature, self.top_p, self.max_new_tokens)


@dataclass
class EvalBatch:
    """What one batch of evaluation produced on this rank, for text panels."""

    prompts: list[str]
    answers: list
    greedy_texts: list[str] | None
    greedy_scores: list[float | None] | None
    samples: list[list[str]]

    def text_blocks(self, limit: int) -> list[str]:
        blocks = []
        for i in range(min(limit, len(self.prompts))):
            block = f"**prompt**: {self.prompts[i]}\n\n**answer**: {self.answers[i]}"
            if self.greedy_texts is not None:
                block += f"\n\n**greedy** (score {self.greedy_scores[i]}): {self.greedy_texts[i]}"
            block += "".join(f"\n\n**sample {j + 1}**: {t}" for j, t in enumerate(self.samples[i]))
            blocks.append(block)
        return blocks


class GenerationEval(torch.nn.Module):
    """Greedy accuracy and k-sample accuracy / diversity of a causal LM on prompts with answers.

    Args:
        sampling: How the k samples are drawn; None = no sampling (greedy only).
        max_new_tokens: Longest greedy completion.
        greedy: Decode greedily as well.
        greedy_name: Name of the greedy accuracy in `compute` (SFT logs `answer_accuracy`, GRPO `greedy_accuracy`).
    """

    def __init__(self, sampling: SamplingConfig | None, max_new_tokens: int, greedy: bool = True, greedy_name: str = "answer_accuracy") -> None:
        super().__init__()
        self.sampling, self.max_new_tokens, self.greedy, self.greedy_name = sampling, max_new_tokens, greedy, greedy_name
        self.greedy_accuracy = MeanMetric()
        self.greedy_length = MeanMetric()
        self.samples = SampleMetrics(ks=tuple(sorted({1, sampling.num_samples})) if sampling else (1,))

    @torch.no_grad()
    def update(self, model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: Sequence[str],
               answers: Sequence, record: bool = True) -> EvalBatch:
        """Generate for one batch of left-padded prompts (columns that are padding in every row are dropped).

        `record=False` generates and counts nothing: under FSDP, `generate` synchronises the ranks at every token,
        so a rank without prompts of its own must still generate (a stand-in prompt) as often as the others.
        """
        from aesl_lightning.scoring.rewards import math_accuracy

        keep = attention_mask.any(dim=0)
        ids, mask = input_ids[:, keep], attention_mask[:, keep]
        prompts, answers = list(prompts), list(answers)
        greedy_texts = greedy_scores = None
        if self.greedy:
            out = generate(model, tokenizer, ids, mask, SamplingConfig(1, 0.0, 1.0, self.max_new_tokens))
            if record:
                greedy_texts = out.texts
                greedy_scores = math_accuracy(prompts, out.texts, answer=answers)
                for score in greedy_scores:
                    if score is not None:
                        self.greedy_accuracy.update(score)
                self.greedy_length.update(out.lengths.float())
        samples: list[list[str]] = [[] for _ in prompts]
        if self.sampling is not None:
            k = self.sampling.num_samples
            sampled = generate(model, tokenizer, ids, mask, self.sampling, record_entropy=True)
            if not record:
                return EvalBatch([], [], None, None, [])
            scores = math_accuracy([p for p in prompts for _ in range(k)], sampled.texts, answer=[a for a in answers for _ in range(k)])
            self.samples.update(sampled, k, eos_ids(model, tokenizer), scores)
            samples = [sampled.texts[i * k : (i + 1) * k] for i in range(len(prompts))]
        if not record:
            return EvalBatch([], [], None, None, [])
        return EvalBatch(prompts, answers, greedy_texts, greedy_scores, samples)

    def compute(self, prefix: str = "", device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Synced values of the metrics that any rank updated; every rank must call it."""
        values = {}
        if any_rank(self.greedy_accuracy.update_called, device):
            values[prefix + self.greedy_name] = self.greedy_accuracy.compute()
        if any_rank(self.greedy_length.update_called, device):
            values[prefix + "greedy_length"] = self.greedy_length.compute()
        if any_rank(self.samples.gen_length.update_called, device):
            values.update(self.samples.compute(prefix=prefix, device=device))
        return {k: v for k, v in values.items() if not torch.isnan(v)}

    def reset(self) -> None:
        self.greedy_accuracy.reset()
        self.greedy_length.reset()
        self.samples.reset()
