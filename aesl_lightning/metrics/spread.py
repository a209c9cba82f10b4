"""MeanSE: a mean over prompts with its standard error, the noise the turning-point margin is built from.

States are the float64 sum, sum of squares and count of per-prompt values, summed across processes, so a
synced value is exact:

    mean = S1 / n,   se = sqrt( (S2 - n * mean^2) / (n - 1) / n )   (NaN for n < 2)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanSE(Metric):
    """Mean of per-prompt values and its standard error; `compute()` -> {name: mean, name + "_se": se}.

    `update(values)` adds one value per prompt (a sequence or 1-D tensor; NaN values are left out).
    `report_mean=False` reports only `name_se` (when the mean itself is kept by another metric, e.g. the
    token-pooled entropy, whose per-prompt spread this then measures).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, name: str, report_mean: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name, self.report_mean = name, report_mean
        for state in ("total", "total_sq"):
            self.add_state(state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, values) -> None:
        x = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
        x = x[~torch.isnan(x)]
        device = self.total.device
        # out of place: states reset under inference mode may not be updated in place outside it
        self.total = self.total + x.sum().to(device)
        self.total_sq = self.total_sq + x.pow(2).sum().to(device)
        self.count = self.count + torch.tensor(x.numel(), dtype=torch.int64, device=device)

    def compute(self) -> dict[str, Tensor]:
        n = int(self.count)
        mean = self.total / n if n > 0 else torch.full_like(self.total, math.nan)
        if n > 1:
            var = ((self.total_sq - n * mean**2) / (n - 1)).clamp(min=0.0)
            se = (var / n).sqrt()
        else:
            se = torch.full_like(self.total, math.nan)
        return ({self.name: mean} if self.report_mean else {}) | {f"{self.name}_se": se}
