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
import torch.distributed as dist
from torchmetrics import MeanMetric

from aesl_lightning.generation import SamplingConfig, eos_ids, generate
from aesl_lightning.sample_metrics import SampleMetrics


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """Whether `flag` is true on any rank (every rank must call this: it is a collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    backend_device = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


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
        self.samples = SampleMetrics(ks=(1, sampling.num_samples) if sampling else (1,))

    @torch.no_grad()
    def update(self, model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: Sequence[str],
               answers: Sequence, record: bool = True) -> EvalBatch:
        """Generate for one batch of left-padded prompts (columns that are padding in every row are dropped).

        `record=False` generates and counts nothing: under FSDP, `generate` synchronises the ranks at every token,
        so a rank without prompts of its own must still generate (a stand-in prompt) as often as the others.
        """
        from aesl_lightning.rewards import math_accuracy

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
