"""Accuracy and diversity of k sampled completions per prompt, as one resettable group of torchmetrics.

Shared by SFT validation (the diversity signal of the turning point) and GRPO (diversity during RL). All
states are sums and counts, so values synced over ranks are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric

from aesl_lightning.generation import Generation
from aesl_lightning.metrics import DistinctN, PassAtK, SelfBLEU, TokenEntropy


def completion_token_groups(generation: Generation, num_samples: int, eos_token_ids: Sequence[int]) -> list[list[list[int]]]:
    """Per prompt, its k completions as token-id lists without the closing EOS (for self-BLEU, distinct-n)."""
    eos = set(eos_token_ids)
    rows = []
    for ids, mask in zip(generation.completion_ids, generation.completion_mask):
        tokens = ids[mask].tolist()
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        rows.append(tokens)
    return [rows[i : i + num_samples] for i in range(0, len(rows), num_samples)]


class SampleMetrics(torch.nn.Module):
    """Metrics of k samples per prompt: entropy of the sampling model at the sampled positions, self-BLEU,
    distinct-2, distinct final answers (the number of different `\\boxed{}` answers among a prompt's k samples,
    unanswered samples left out: what RL can explore), mean length, truncation rate, sample accuracy and pass@k.

    `compute(prefix)` returns `{prefix + "gen_entropy": ..., prefix + "self_bleu": ..., ...}`; every rank must
    call it (metrics that some rank updated are synced).
    """

    def __init__(self, ks: Sequence[int] = (1,)) -> None:
        super().__init__()
        self.gen_entropy = TokenEntropy()
        self.self_bleu = SelfBLEU()
        self.distinct_2 = DistinctN(2)
        self.gen_length = MeanMetric()
        self.gen_truncated = MeanMetric()
        self.sample_accuracy = MeanMetric()
        self.pass_at = PassAtK(ks=tuple(sorted(set(ks))))
        self.distinct_answers = MeanMetric()

    def update(
        self,
        generation: Generation,
        num_samples: int,
        eos_token_ids: Sequence[int],
        scores: Sequence[float | None] | None = None,
    ) -> None:
        """Add one batch of prompts x `num_samples` completions; `scores` are per-completion rewards in
        [0, 1] (1 = correct), None where a completion has no ground truth."""
        if generation.entropy is not None:
            self.gen_entropy.update_from_values(generation.entropy, generation.completion_mask)
        groups = completion_token_groups(generation, num_samples, eos_token_ids)
        self.self_bleu.update(groups)
        self.distinct_2.update(groups)
        self.gen_length.update(generation.lengths.float())
        self.gen_truncated.update(generation.truncated.float())
        from aesl_lightning.rewards import extract_boxed

        boxed = [extract_boxed(text) for text in generation.texts]
        for i in range(0, len(boxed), num_samples):
            found = {" ".join(a.split()) for a in boxed[i : i + num_samples] if a}
            self.distinct_answers.update(float(len(found)))
        if scores is not None:
            counted = [s for s in scores if s is not None]
            if counted:
                self.sample_accuracy.update(torch.tensor(counted, dtype=torch.float32))
            ns, cs = [], []
            for i in range(0, len(scores), num_samples):
                group = [s for s in scores[i : i + num_samples] if s is not None]
                if group:
                    ns.append(len(group))
                    cs.append(sum(1 for s in group if s >= 1.0))
            if ns:
                self.pass_at.update(ns, cs)

    def compute(self, prefix: str = "", device: torch.device | None = None) -> dict[str, torch.Tensor]:
        from aesl_lightning.evaluation import any_rank

        values = {
            "gen_entropy": self.gen_entropy.compute(),
            "self_bleu": self.self_bleu.compute(),
            "distinct_2": self.distinct_2.compute(),
            "distinct_answers": self.distinct_answers.compute(),
            "gen_length": self.gen_length.compute(),
            "gen_truncated": self.gen_truncated.compute(),
        }
        # decided on every rank alike: compute() is a collective, and a rank without scored samples must still enter it
        if any_rank(self.sample_accuracy.update_called, device):
            values["sample_accuracy"] = self.sample_accuracy.compute()
        if any_rank(self.pass_at.update_called, device):
            values.update(self.pass_at.compute())
        return {prefix + k: v.float() for k, v in values.items() if not torch.isnan(v)}

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()
