"""Accuracy and diversity of k sampled completions per prompt, as one resettable group of torchmetrics.

Shared by SFT validation (the diversity signal of the turning point) and GRPO (diversity during RL). All
states are sums and counts, so values synced over ranks are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric, MetricCollection

from aesl_lightning.infra.distributed import any_rank
from aesl_lightning.infra.generation import Generation
from aesl_lightning.metrics import PassAtK, TokenEntropy, distinct_n_batch, pass_at_k, self_bleu_batch
from aesl_lightning.metrics.spread import MeanSE


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


class SampleMetrics(MetricCollection):
    """Metrics of k samples per prompt, as a torchmetrics `MetricCollection`: entropy of the sampling model at
    the sampled positions, self-BLEU, distinct-2, distinct final answers (the number of different `\\boxed{}`
    answers among a prompt's k samples, unanswered samples left out: what RL can explore), mean length,
    truncation rate, sample accuracy and pass@k; the share of samples with a final `\\boxed{}` answer
    (`boxed_rate`, the format the cold start teaches) and `pass_gap` = pass@k - pass@1 per prompt (what k
    tries add over one: exploration that does not grow with length). Self-BLEU, distinct-2, distinct answers,
    pass_gap and the entropy also report `<name>_se`, the standard error over prompts (the entropy's from
    per-prompt means of the token-pooled value): the noise margin of the turning point.

    The collection brings reset, device moves, state dicts and iteration; `update` feeds each member the view
    of the batch it reads (one pass over the completions, not one per metric), and `compute(prefix)` returns
    `{prefix + "gen_entropy": ..., prefix + "self_bleu": ..., ...}`. Every rank must call `compute` (metrics
    that some rank updated are synced; one that no rank updated is left out).
    """

    def __init__(self, ks: Sequence[int] = (1,)) -> None:
        super().__init__({
            "gen_entropy": TokenEntropy(),
            "gen_entropy_spread": MeanSE("gen_entropy", report_mean=False),
            "self_bleu": MeanSE("self_bleu"),
            "distinct_2": MeanSE("distinct_2"),
            "distinct_answers": MeanSE("distinct_answers"),
            "boxed_rate": MeanMetric(),
            "gen_length": MeanMetric(),
            "gen_truncated": MeanMetric(),
            "sample_accuracy": MeanMetric(),
            "pass_at": PassAtK(ks=tuple(sorted(set(ks)))),
            "pass_gap": MeanSE("pass_gap"),
        }, compute_groups=False)

    def update(
        self,
        generation: Generation,
        num_samples: int,
        eos_token_ids: Sequence[int],
        scores: Sequence[float | None] | None = None,
    ) -> None:
        """Add one batch of prompts x `num_samples` completions; `scores` are per-completion rewards in
        [0, 1] (1 = correct), None where a completion has no ground truth."""
        from aesl_lightning.scoring.rewards import extract_boxed

        if generation.entropy is not None:
            self["gen_entropy"].update_from_values(generation.entropy, generation.completion_mask)
            mask = generation.completion_mask.reshape(-1, num_samples * generation.completion_mask.shape[-1]).double()
            summed = (generation.entropy.double().reshape(mask.shape) * mask).sum(-1)
            self["gen_entropy_spread"].update(summed / mask.sum(-1))  # a prompt without tokens gives NaN: left out
        groups = completion_token_groups(generation, num_samples, eos_token_ids)
        self["self_bleu"].update(self_bleu_batch(groups))  # NaN for k < 2: left out
        self["distinct_2"].update(distinct_n_batch(groups, 2))
        self["gen_length"].update(generation.lengths.float())
        self["gen_truncated"].update(generation.truncated.float())
        boxed = [extract_boxed(text) for text in generation.texts]
        found = [{" ".join(a.split()) for a in boxed[i : i + num_samples] if a} for i in range(0, len(boxed), num_samples)]
        if found:
            self["distinct_answers"].update(torch.tensor([float(len(f)) for f in found]))
        if boxed:
            self["boxed_rate"].update(torch.tensor([1.0 if a else 0.0 for a in boxed]))
        if scores is None:
            return
        counted = [s for s in scores if s is not None]
        if counted:
            self["sample_accuracy"].update(torch.tensor(counted, dtype=torch.float32))
        groups_scored = [[s for s in scores[i : i + num_samples] if s is not None] for i in range(0, len(scores), num_samples)]
        groups_scored = [g for g in groups_scored if g]
        if groups_scored:
            correct = [sum(1 for s in g if s >= 1.0) for g in groups_scored]
            self["pass_at"].update([len(g) for g in groups_scored], correct)
            gaps = [pass_at_k(len(g), c, num_samples) - c / len(g) for g, c in zip(groups_scored, correct) if len(g) >= num_samples]
            if gaps:
                self["pass_gap"].update(gaps)

    def compute(self, prefix: str = "", device: torch.device | None = None) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for name, metric in self.items(keep_base=True, copy_state=False):
            # decided on every rank alike: compute() is a collective, and a rank that saw nothing must enter it
            if name in ("sample_accuracy", "pass_at", "pass_gap") and not any_rank(metric.update_called, device):
                continue
            value = metric.compute()
            values.update(value if isinstance(value, dict) else {name: value})
        return {prefix + k: v.float() for k, v in values.items() if not torch.isnan(v)}
