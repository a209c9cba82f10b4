"""torchmetrics Metrics that accumulate the functions of `aesl_lightning.metrics.functional` over batches.

States are sums and counts with `dist_reduce_fx="sum"`, so a DDP sync is exact: `TokenEntropy`, `SelfBLEU`,
`DistinctN`, `PassAtK`, `KLToBase`. A metric that has counted nothing computes NaN. The pure functions are
importable from here too (`from aesl_lightning.metrics import self_bleu_batch`), as torchmetrics' are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from aesl_lightning.ops.kernels import token_entropy
from aesl_lightning.metrics.functional import (
    Sample,
    distinct_n_batch,
    kl_divergence,
    pass_at_k,
    self_bleu_batch,
    tokenize_text,
)

__all__ = [
    "tokenize_text",
    "self_bleu_batch",
    "distinct_n_batch",
    "pass_at_k",
    "kl_divergence",
    "TokenEntropy",
    "SelfBLEU",
    "DistinctN",
    "PassAtK",
    "KLToBase",
]


class _SumCountMetric(Metric):
    """A mean kept as a float64 sum and a count, both summed across processes (an exact sync)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add(self, total: Tensor | float, count: Tensor | int) -> None:
        # out of place: states reset under `torch.inference_mode` (a `trainer.validate()` before `fit()`) are
        # inference tensors, which may not be updated in place outside it
        self.total = self.total + torch.as_tensor(total, dtype=torch.float64, device=self.total.device)
        self.count = self.count + torch.as_tensor(count, dtype=torch.int64, device=self.count.device)

    def compute(self) -> Tensor:
        return self.total / self.count if self.count > 0 else torch.full_like(self.total, math.nan)


class TokenEntropy(_SumCountMetric):
    """Mean predictive entropy H_t = -sum_v p(v|ctx) log p(v|ctx), in nats, over all masked positions seen.

    `update(logits [B, T, V], mask [B, T] | None)` (no shifting: mask marks the rows of `logits` to count),
    or `update_from_values(entropy [B, T], mask)` with per-token entropies already computed (e.g. by the
    chunked loss path). Positions are pooled over batches and processes (a token mean, not a batch mean).
    """

    higher_is_better = True

    def __init__(self, chunk_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_size = chunk_size

    def update(self, logits: Tensor | None = None, mask: Tensor | None = None, *, entropy: Tensor | None = None) -> None:
        """Add masked positions from `logits` [B, T, V], or from per-token `entropy` [B, T] already computed."""
        if (logits is None) == (entropy is None):
            raise ValueError("TokenEntropy.update: pass exactly one of logits or entropy")
        if logits is not None:
            total = token_entropy(logits.detach(), mask, chunk_size=self.chunk_size, reduction="sum")
            self._add(total, logits.shape[:-1].numel() if mask is None else mask.sum())
            return
        entropy = entropy.detach().to(torch.float64)
        if mask is None:
            self._add(entropy.sum(), entropy.numel())
            return
        if mask.shape != entropy.shape:
            raise ValueError(f"TokenEntropy.update: mask must have the entropy's shape {list(entropy.shape)}, found {list(mask.shape)}")
        self._add(torch.where(mask.bool(), entropy, 0.0).sum(), mask.bool().sum())

    def update_from_values(self, entropy: Tensor, mask: Tensor | None = None) -> None:
        """`update(entropy=..., mask=...)`: goes through torchmetrics' wrapped `update`, so the update count and
        the cached `compute()` result stay right."""
        self.update(entropy=entropy, mask=mask)


class SelfBLEU(_SumCountMetric):
    """Mean over prompts of per-prompt self-BLEU (`self_bleu_batch`); lower means more diverse.

    `update(groups)`: one group per prompt, each the k sampled completions as token-id lists / 1-D tensors
    (padding removed), token lists or strings (split by `tokenize_text`). Prompts with k < 2 have no
    self-BLEU and are skipped (not counted).
    """

    higher_is_better = False

    def update(self, groups: Sequence[Sequence[Sample]]) -> None:
        scores = [s for s in self_bleu_batch(groups) if not math.isnan(s)]
        self._add(math.fsum(scores), len(scores))


class DistinctN(_SumCountMetric):
    """Mean over prompt groups of `distinct_n_batch`: unique / total n-grams among a prompt's k samples.

    Per-group (not global) so the value does not drift with the number of prompts seen, and it is a sum and
    count, so it syncs exactly. A group without any n-gram counts as 0. `update(groups)` as for `SelfBLEU`.
    """

    higher_is_better = True

    def __init__(self, n: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"DistinctN: n must be >= 1, found {n}")
        self.n = n

    def update(self, groups: Sequence[Sequence[Sample]]) -> None:
        self._add(math.fsum(distinct_n_batch(groups, self.n)), len(groups))


class PassAtK(Metric):
    """pass@k (`pass_at_k`) averaged over problems, for each k in `ks`; compute() -> {"pass@k": value}.

    `update(num_samples, num_correct)`: per problem, n samples drawn and c of them correct (sequences or 1-D
    tensors of equal length). A problem with n < k has no pass@k estimate and is left out of that k's mean;
    a k with no problem computes NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 4, 8), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"PassAtK: ks must be a non-empty list of integers >= 1, found {list(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.add_state("total", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(len(self.ks), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, num_samples: Sequence[int] | Tensor, num_correct: Sequence[int] | Tensor) -> None:
        ns = torch.as_tensor(num_samples).reshape(-1).tolist()
        cs = torch.as_tensor(num_correct).reshape(-1).tolist()
        if len(ns) != len(cs):
            raise ValueError(f"PassAtK.update: num_samples and num_correct must have one entry per problem, found {len(ns)} and {len(cs)}")
        totals, counts = [0.0] * len(self.ks), [0] * len(self.ks)
        for n, c in zip(ns, cs):
            for j, k in enumerate(self.ks):
                if n >= k:
                    totals[j] += pass_at_k(int(n), int(c), k)
                    counts[j] += 1
        self.total = self.total + torch.tensor(totals, dtype=torch.float64, device=self.total.device)  # out of place: see _add
        self.count = self.count + torch.tensor(counts, dtype=torch.int64, device=self.count.device)

    def compute(self) -> dict[str, Tensor]:
        means = torch.where(self.count > 0, self.total / self.count.clamp(min=1), math.nan)
        return {f"pass@{k}": means[j] for j, k in enumerate(self.ks)}


class KLToBase(_SumCountMetric):
    """Mean per-token KL(p_theta || p_base) over masked positions (`kl_divergence`), in nats.

    `update(logits [B, T, V], base_logits [B, T, V], mask [B, T] | None)`: base_logits may be logits or
    log-probabilities (e.g. cached from the frozen base model). No shifting; computed in row chunks.
    """

    higher_is_better = False

    def __init__(self, chunk_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_size = chunk_size

    def update(self, logits: Tensor, base_logits: Tensor, mask: Tensor | None = None) -> None:
        total = kl_divergence(logits.detach(), base_logits.detach(), mask, chunk_size=self.chunk_size, reduction="sum")
        self._add(total, logits.shape[:-1].numel() if mask is None else mask.bool().sum())
