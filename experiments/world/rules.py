"""The pre-registered rules that pick starting checkpoints from an SFT run's grid (see plan.md), pure functions.

A grid row is `{"step", "summary", "columns"}` as `stages.GridEvaluation` records it.

- format gate: a grid point counts once the share of the k samples in the target format is >= FORMAT_LEVEL;
- best accuracy: the first grid point with the highest greedy target-format accuracy on the validation problems
  (what a ModelCheckpoint on accuracy keeps: a later tie does not replace it);
- turning point (the paper's signals): the diversity score D = token entropy (nats) - self-BLEU of the k
  samples, per problem; among gated points the one with the highest mean D is the peak; a turning point is
  *detected* when a later point's mean D falls below the peak by more than MARGIN_K standard errors of the
  difference (standard errors over problems, paired); the turning-point arm starts from the peak either way;
- ground truth: the same rule on the strategy entropy of each problem's k samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FORMAT_LEVEL = 0.8
MARGIN_K = 2.0


def _entropy_bits(counts: Sequence[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c) if total else 0.0


def paper_score(columns: dict) -> list[float]:
    """Per problem: token entropy (nats) - self-BLEU of its k samples (NaN self-BLEU counts as 0)."""
    return [e - (0.0 if math.isnan(b) else b) for e, b in zip(columns["token_entropy"], columns["self_bleu"])]


def strategy_score(columns: dict) -> list[float]:
    """Per problem: entropy (bits) of the strategies of its k samples (the ground-truth diversity)."""
    return [_entropy_bits(c) for c in columns["strategy_counts"]]


SCORES = {"paper": paper_score, "strategy": strategy_score}


def gated(grid: Sequence[dict]) -> list[dict]:
    return [row for row in grid if row["summary"].get("target_rate", 0.0) >= FORMAT_LEVEL]


def best_accuracy(grid: Sequence[dict]) -> dict:
    """The first grid row with the highest greedy accuracy."""
    best = grid[0]
    for row in grid[1:]:
        if row["summary"]["greedy_accuracy"] > best["summary"]["greedy_accuracy"]:
            best = row
    return best


def _mean_se_of_difference(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the paired difference x - y over problems."""
    d = [a - b for a, b in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def turning_point(grid: Sequence[dict], score: str = "paper") -> dict:
    """`{"peak_step", "detected", "drop_step", "format_step", "reason"}` by the rule in the module docstring.
    Without a gated point: peak None (the format was never learned)."""
    f = SCORES[score]
    rows = gated(grid)
    if not rows:
        return {"peak_step": None, "detected": False, "drop_step": None, "format_step": None, "reason": "format never learned"}
    values = {row["step"]: f(row["columns"]) for row in rows}
    means = {s: sum(v) / len(v) for s, v in values.items()}
    peak = max(means, key=lambda s: (means[s], -s))  # the earliest of equal peaks
    for row in rows:
        if row["step"] <= peak:
            continue
        drop, se = _mean_se_of_difference(values[peak], values[row["step"]])
        if drop > MARGIN_K * se and drop > 0:
            return {"peak_step": peak, "detected": True, "drop_step": row["step"], "format_step": rows[0]["step"],
                    "reason": f"mean {score} score fell by {drop:.3f} (> {MARGIN_K} x SE {se:.3f}) at step {row['step']}"}
    last = rows[-1]["step"]
    reason = "peak at the last gated point" if peak == last else f"no later point fell by more than {MARGIN_K} SE"
    return {"peak_step": peak, "detected": False, "drop_step": None, "format_step": rows[0]["step"], "reason": reason}


def row_at(grid: Sequence[dict], step: int) -> dict:
    for row in grid:
        if row["step"] == step:
            return row
    raise KeyError(f"no grid point at step {step}")
