"""The pre-registered rules that pick snapshots from a CE run's validation grid (plan amendment 1), pure functions.

A grid row is `{"step", "columns", "summary"}` as `stages.run_sft` records it (columns: `evaluate.evaluate`).

- best accuracy: the grid point after step 0 with the highest greedy validation accuracy, the earliest of ties;
- the paper's score per problem: D = token entropy of its k samples (nats) - their self-BLEU (the toolkit's default
  weights of the two signals; a missing self-BLEU counts as 0); a point's D is the mean over problems and its noise
  the bootstrap SE of that mean (problems resampled);
- format gate: grid points from the first one whose sample boxed rate is >= the format level on (the "format step";
  `aesl_lightning.maths.turning_point.find_turning_point`'s gate, which stays open once reached);
- turning point: the peak is the gated point with the highest D (the earliest of ties); it is a turning point when
  a later gated point lies more than `noise_k` x sqrt(SE_peak^2 + SE_later^2) below it (no smoothing, patience 1:
  `find_turning_point` run from the peak on). The turning-point arm starts from the peak whether or not it is
  confirmed; without a gated point (format never learned) there is no peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def best_accuracy(grid: Sequence[dict]) -> dict:
    """The first grid row after step 0 with the highest greedy accuracy (step 0 only if it is the only row)."""
    trained = [row for row in grid if row["step"] > 0] or list(grid)
    best = trained[0]
    for row in trained[1:]:
        if row["summary"]["greedy_accuracy"] > best["summary"]["greedy_accuracy"]:
            best = row
    return best


def paper_scores(columns: dict) -> list[float]:
    """Per problem: entropy - self-BLEU of its k samples (a missing self-BLEU counts as 0)."""
    return [float(e) - (0.0 if b is None or (isinstance(b, float) and math.isnan(b)) else float(b))
            for e, b in zip(columns["entropy"], columns["self_bleu"])]


def bootstrap_se(values: Sequence[float], replicates: int = 1000, seed: int = 0) -> float:
    """Standard deviation of the mean of `values` over `replicates` resamples with replacement (seeded)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return float("nan")
    index = np.random.default_rng(seed).integers(0, x.size, size=(replicates, x.size))
    return float(x[index].mean(axis=1).std(ddof=1))


def turning_point(grid: Sequence[dict], format_level: float = 0.8, noise_k: float = 2.0, replicates: int = 1000) -> dict:
    """`{"format_step", "peak_step", "detected", "drop_step", "reason", "curve"}` by the rule in the module docstring;
    `curve` holds each point's D, its SE and its sample boxed rate."""
    from aesl_lightning.maths.turning_point import find_turning_point

    steps = [int(row["step"]) for row in grid]
    scores = [float(np.mean(paper_scores(row["columns"]))) for row in grid]
    noise = [bootstrap_se(paper_scores(row["columns"]), replicates, seed=step) for step, row in zip(steps, grid)]
    rates = [row["summary"].get("sample_boxed_rate") for row in grid]
    curve = [{"step": s, "score": d, "se": e, "boxed_rate": r} for s, d, e, r in zip(steps, scores, noise, rates)]
    gate = find_turning_point(steps, scores, noise, rates, format_level=format_level, noise_k=noise_k, patience=1, smoothing="none")
    gated = [e for e in gate.history if e["status"] not in ("format", "skipped", "warmup")]
    if not gated:
        return {"format_step": None, "peak_step": None, "detected": False, "drop_step": None, "curve": curve,
                "reason": f"format never learned (sample boxed rate never reached {format_level})"}
    peak = gated[0]
    for entry in gated[1:]:
        if entry["score"] > peak["score"]:
            peak = entry
    i = steps.index(peak["step"])
    after = find_turning_point(steps[i:], scores[i:], noise[i:], None, noise_k=noise_k, patience=1, smoothing="none")
    drop = next((e["step"] for e in after.history if e["status"] == "below"), None)
    reason = (f"D fell from {peak['score']:.3f} at step {peak['step']} by more than {noise_k} SE of the difference at step {drop}"
              if drop is not None else
              "the peak is the last grid point" if i == len(steps) - 1 else
              f"no later point fell more than {noise_k} SE of the difference below the peak at step {peak['step']}")
    return {"format_step": gated[0]["step"], "peak_step": peak["step"], "detected": drop is not None, "drop_step": drop,
            "reason": reason, "curve": curve}


def chosen_steps(grid: Sequence[dict], format_level: float, final: bool) -> dict[str, int | None]:
    """The steps the rules pick from `grid` so far: best accuracy, the paper's peak and (when `final`) the end;
    the snapshots a CE unit must keep (every other snapshot may be deleted)."""
    tp = turning_point(grid, format_level, replicates=2)  # the peak does not depend on the SE
    return {"best_accuracy": best_accuracy(grid)["step"], "turning_point": tp["peak_step"], "end": grid[-1]["step"] if final else None}


def row_at(grid: Sequence[dict], step: int) -> dict:
    for row in grid:
        if row["step"] == step:
            return row
    raise KeyError(f"no grid point at step {step}")
