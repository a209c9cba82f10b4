"""Paired statistics of the studies (pure functions, no I/O): differences paired by seed and problem,
a hierarchical bootstrap (seeds, then problems), McNemar's exact test (per seed, combined over seeds by Fisher's
method), a sign-flip test over seeds (two- or one-sided), an OLS slope and the smallest detectable effect of the
design.

Data layout: an outcome matrix `[seed][problem]` per arm (1 = correct, 0 = wrong, or a fraction such as
pass@1), every arm evaluated on the same problems in the same order; the paired difference of arms A and B
is `D[s][i] = A[s][i] - B[s][i]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def paired_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """`D[s, i] = a[s][i] - b[s][i]`; both must be seeds x problems of the same shape."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"paired_differences: expected two seeds x problems matrices of one shape, found {a.shape} and {b.shape}")
    return a - b


def align(rows_a: Sequence[dict], rows_b: Sequence[dict], key: str = "source") -> None:
    """Raise unless two per-problem row lists are the same problems in the same order (by `key`)."""
    ids_a, ids_b = [r[key] for r in rows_a], [r[key] for r in rows_b]
    if ids_a != ids_b:
        first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        raise ValueError(f"align: the two evaluations differ at problem {first} ({len(ids_a)} vs {len(ids_b)} problems); "
                         "pairing needs the same problems in the same order")


def discordant_pairs(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(n10, n01): pairs where only `a` is correct, and where only `b` is."""
    if len(a) != len(b):
        raise ValueError(f"discordant_pairs: {len(a)} and {len(b)} outcomes")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    return n10, n01


def mcnemar_exact(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value: under H0 the discordant pairs split as Binomial(n, 1/2), n = n10 + n01,
    p = min(1, 2 * P(X <= min(n10, n01))). No discordant pairs: p = 1."""
    n = n10 + n01
    if n10 < 0 or n01 < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, found {n10}, {n01}")
    if n == 0:
        return 1.0
    low = min(n10, n01)
    # log-space sum of the lower tail: exact enough for any n and never overflows
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(low + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    replicates: int

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level, "replicates": self.replicates}


def bootstrap_means(d: np.ndarray, seed_index: np.ndarray, problem_index: np.ndarray) -> np.ndarray:
    """Replicate means of `d` (seeds x problems) for given resampling indices.

    `seed_index` [B, S] and `problem_index` [B, N]: replicate b is the mean over s, i of
    `d[seed_index[b, s], problem_index[b, i]]` (problems are crossed with seeds: every seed of a replicate is
    evaluated on the same resampled problems, as every seed of the study is evaluated on the same test set).
    """
    per_seed = d[:, problem_index].mean(axis=2)  # [S, B]: each seed's mean under replicate b's problems
    return per_seed[seed_index, np.arange(seed_index.shape[0])[:, None]].mean(axis=1)


def hierarchical_bootstrap(d: Sequence[Sequence[float]], replicates: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile interval of the mean paired difference: resample seeds with replacement, then problems.

    With few seeds the seed stage has few distinct outcomes (3 seeds: 10 multisets) and the interval is
    narrower than the truth when seeds differ; the plan states this and reads seeds' signs beside it.
    """
    d = np.asarray(d, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"hierarchical_bootstrap: expected a non-empty seeds x problems matrix, found shape {d.shape}")
    rng = np.random.default_rng(seed)
    seeds, problems = d.shape
    seed_index = rng.integers(0, seeds, size=(replicates, seeds))
    problem_index = rng.integers(0, problems, size=(replicates, problems))
    means = bootstrap_means(d, seed_index, problem_index)
    alpha = (1.0 - level) / 2
    return Interval(float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), level, replicates)


def ols_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x: sum (x - mx)(y - my) / sum (x - mx)^2 (NaN for fewer than 2 distinct x)."""
    if len(x) != len(y):
        raise ValueError(f"ols_slope: {len(x)} x values and {len(y)} y values")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if b is not None and not math.isnan(float(b))]
    if len({a for a, _ in pairs}) < 2:
        return float("nan")
    mx = sum(a for a, _ in pairs) / len(pairs)
    my = sum(b for _, b in pairs) / len(pairs)
    return sum((a - mx) * (b - my) for a, b in pairs) / sum((a - mx) ** 2 for a, _ in pairs)


def minimum_detectable_effect(n_seeds: int, n_problems: int, discordance: float, seed_sd: float, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """Smallest true mean difference detected with probability `power` by a two-sided level-`alpha` test.

    SE of the mean paired difference under a seeds x problems design: sqrt(seed_sd^2 / S + v / (S N)), with
    v = discordance (the variance of a per-problem difference in {-1, 0, 1} of mean ~0 is the share of
    discordant pairs) and seed_sd the standard deviation of a seed's mean difference around the truth (RL's
    run-to-run spread). MDE = (z_{1 - alpha/2} + z_{power}) * SE.
    """
    if n_seeds < 1 or n_problems < 1 or not 0 <= discordance <= 1 or seed_sd < 0:
        raise ValueError(f"minimum_detectable_effect: bad design ({n_seeds} seeds, {n_problems} problems, "
                         f"discordance {discordance}, seed_sd {seed_sd})")
    return detectable_effect(n_seeds, n_problems, discordance, seed_sd, alpha, power)


def detectable_effect(n_seeds: int, n_problems: int, problem_variance: float, seed_sd: float, alpha: float = 0.05,
                      power: float = 0.8) -> float:
    """`minimum_detectable_effect` for any per-problem measure: (z_{1 - alpha/2} + z_{power}) * SE with
    SE = sqrt(seed_sd^2 / S + v / (S N)), v = the variance of a per-problem paired difference within a seed (for a
    count such as distinct answers among k it can exceed 1)."""
    if n_seeds < 1 or n_problems < 1 or not problem_variance >= 0 or not seed_sd >= 0:
        raise ValueError(f"detectable_effect: bad design ({n_seeds} seeds, {n_problems} problems, "
                         f"variance {problem_variance}, seed_sd {seed_sd})")
    z = NormalDist()
    se = math.sqrt(seed_sd**2 / n_seeds + problem_variance / (n_seeds * n_problems))
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se


def seed_signs(d: Sequence[Sequence[float]]) -> list[int]:
    """The sign (+1, 0, -1) of each seed's mean paired difference."""
    return [int(np.sign(row.mean())) for row in np.asarray(d, dtype=float)]


def seed_means(d: Sequence[Sequence[float]]) -> np.ndarray:
    """Each seed's mean paired difference (the independent units of a seeds x problems design)."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"seed_means: expected a non-empty seeds x problems matrix, found shape {d.shape}")
    return d.mean(axis=1)


def sign_flip_p(d: Sequence[Sequence[float]], replicates: int = 20000, seed: int = 0, alternative: str = "two-sided") -> float:
    """p-value of "no mean paired difference" that respects the clustering by seed.

    Under H0 (the arms are exchangeable within a seed) each seed's mean difference m_s is as likely to carry
    either sign; the statistic is compared with its value under every sign pattern (exactly for up to 16 seeds,
    else `replicates` random patterns). `alternative`: "two-sided" (statistic |mean_s m_s|), "greater" (mean_s m_s,
    large values count against H0: "A - B > 0") or "less" (-mean_s m_s). Problems x seeds are never pooled as
    independent: with S seeds the smallest attainable p is 2 / 2^S two-sided (10 seeds: 0.002) and 1 / 2^S
    one-sided (5 seeds: 1/32 = 0.031, reached when every seed's mean has the claimed sign).
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"sign_flip_p: alternative must be 'two-sided', 'greater' or 'less', found {alternative!r}")
    m = seed_means(d)
    s = len(m)
    if s <= 16:
        signs = ((np.arange(2**s)[:, None] >> np.arange(s)) & 1) * 2 - 1
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(replicates, s))
    flipped = (signs * m).mean(axis=1)
    if alternative == "two-sided":
        flipped, observed = np.abs(flipped), abs(m.mean())
    elif alternative == "greater":
        observed = m.mean()
    else:
        flipped, observed = -flipped, -m.mean()
    return float(np.mean(flipped >= observed - 1e-12))


def fisher_combined(p_values: Sequence[float]) -> float:
    """Fisher's method: X = -2 sum_s ln p_s follows chi^2 with 2S degrees of freedom when every p_s is uniform
    under H0; the combined p = P(chi^2_2S >= X) = exp(-X/2) sum_{i<S} (X/2)^i / i! (closed form for even degrees of
    freedom). One p-value combines to itself. Exact tests' discrete p-values make it conservative."""
    ps = [float(p) for p in p_values]
    if not ps or any(not 0 <= p <= 1 for p in ps):
        raise ValueError(f"fisher_combined: expected one or more p-values in [0, 1], found {ps}")
    if min(ps) == 0:
        return 0.0
    half = -sum(math.log(p) for p in ps)  # X / 2
    term, total = 1.0, 1.0
    for i in range(1, len(ps)):
        term *= half / i
        total += term
    return min(1.0, math.exp(-half) * total)


def fisher_combined_mcnemar(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict:
    """Per-seed exact McNemar tests of two arms' 0/1 outcomes (seeds x problems, paired by problem within a seed),
    combined over seeds by Fisher's method: `{"p", "per_seed": [{"n10", "n01", "p"}, ...]}` (n10: only `a` right).
    Problems are paired within a seed only; seeds are the independent replicates."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"fisher_combined_mcnemar: expected two seeds x problems matrices of one shape, found {a.shape} and {b.shape}")
    per_seed = []
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        n10, n01 = discordant_pairs(row_a, row_b)
        per_seed.append({"n10": n10, "n01": n01, "p": mcnemar_exact(n10, n01)})
    return {"p": fisher_combined([x["p"] for x in per_seed]), "per_seed": per_seed}


def seed_sd(d: Sequence[Sequence[float]]) -> float:
    """Standard deviation (n - 1) of the seeds' mean differences: the run-to-run spread the MDE uses."""
    m = seed_means(d)
    return float(m.std(ddof=1)) if len(m) > 1 else float("nan")


def verdict(interval: Interval, p: float, smallest_effect: float, alpha: float = 0.05) -> str:
    """The claim "A beats B" from the paired interval of mean(A - B):

    - `supported`: the interval lies above 0 and the clustered test rejects at `alpha`;
    - `refuted`: the interval lies below `smallest_effect` (no effect of that size or larger; worded so);
    - `opposite`: the interval lies below 0 and the test rejects (B beats A);
    - `inconclusive` otherwise.
    """
    if interval.low > 0 and p < alpha:
        return "supported"
    if interval.high < 0 and p < alpha:
        return "opposite"
    if interval.high < smallest_effect:
        return "refuted"
    return "inconclusive"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values and {len(y)} y values")

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")
