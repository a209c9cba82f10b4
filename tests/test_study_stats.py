"""The studies' paired statistics (aesl_lightning/study/stats.py) against slow, obvious references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from aesl_lightning.study import stats as S


def _mcnemar_reference(n10: int, n01: int) -> float:
    # sum of the Binomial(n, 1/2) probabilities of every split at most as likely as the observed one
    n = n10 + n01
    if n == 0:
        return 1.0
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    observed = probs[n10]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-12)))


@pytest.mark.parametrize("n10,n01", [(0, 0), (0, 1), (1, 0), (3, 3), (5, 0), (0, 6), (2, 9), (9, 2), (10, 15), (30, 12), (1, 40)])
def test_mcnemar_exact_matches_the_binomial_sum(n10, n01):
    assert S.mcnemar_exact(n10, n01) == pytest.approx(_mcnemar_reference(n10, n01), rel=1e-9, abs=1e-15)


def test_mcnemar_known_values_and_large_counts():
    assert S.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert S.mcnemar_exact(7, 7) == 1.0
    p = S.mcnemar_exact(400, 600)  # no overflow; a 40/60 split of 1000 is far from chance
    assert 0 < p < 1e-9
    with pytest.raises(ValueError, match="counts must be >= 0"):
        S.mcnemar_exact(-1, 2)


def test_discordant_pairs_and_paired_differences():
    a, b = [1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0]
    assert S.discordant_pairs(a, b) == (2, 1)
    d = S.paired_differences([a, b], [b, a])
    assert d.tolist() == [[0, 1, -1, 0, 1, 0], [0, -1, 1, 0, -1, 0]]
    with pytest.raises(ValueError, match="one shape"):
        S.paired_differences([[1, 0]], [[1, 0, 1]])


def test_align_names_the_first_mismatch():
    rows = [{"source": "t:1"}, {"source": "t:2"}]
    S.align(rows, list(rows))
    with pytest.raises(ValueError, match="differ at problem 1"):
        S.align(rows, [{"source": "t:1"}, {"source": "t:3"}])


def test_bootstrap_means_against_a_loop():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(3, 7))
    seed_index = rng.integers(0, 3, size=(5, 3))
    problem_index = rng.integers(0, 7, size=(5, 7))
    loop = [sum(d[seed_index[b, s], problem_index[b, i]] for s in range(3) for i in range(7)) / 21 for b in range(5)]
    np.testing.assert_allclose(S.bootstrap_means(d, seed_index, problem_index), loop, rtol=1e-12)


def test_hierarchical_bootstrap_is_reproducible_and_centred():
    rng = np.random.default_rng(2)
    d = rng.integers(-1, 2, size=(3, 100))
    first, again = S.hierarchical_bootstrap(d, 500, seed=7), S.hierarchical_bootstrap(d, 500, seed=7)
    assert first == again
    assert first.estimate == pytest.approx(d.mean())
    assert first.low < first.estimate < first.high
    assert S.hierarchical_bootstrap(d, 500, seed=8) != first
    constant = S.hierarchical_bootstrap(np.full((3, 20), 0.25), 200)
    assert (constant.low, constant.high) == pytest.approx((0.25, 0.25))


def test_hierarchical_bootstrap_covers_a_known_mean():
    # seeds x problems with a seed effect and per-problem noise around a known mean: the 90% interval should
    # cover the truth about 90% of the time when there are enough seeds for the seed stage to work
    rng = np.random.default_rng(3)
    truth, hits, sims = 0.1, 0, 150
    for _ in range(sims):
        d = truth + rng.normal(0, 0.05, size=(12, 1)) + rng.normal(0, 0.5, size=(1, 60)) + rng.normal(0, 0.5, size=(12, 60))
        interval = S.hierarchical_bootstrap(d, 300, seed=int(rng.integers(1 << 30)), level=0.9)
        hits += interval.low <= truth <= interval.high
    assert 0.8 <= hits / sims <= 0.97, hits / sims


def test_ols_slope():
    assert S.ols_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert S.ols_slope([0, 1, 2], [0.5, 0.5, 0.5]) == 0.0
    assert math.isnan(S.ols_slope([1, 1], [0, 1]))
    xs = list(range(10))
    ys = [0.3 * x + random.Random(x).uniform(-0.1, 0.1) for x in xs]
    assert S.ols_slope(xs, ys) == pytest.approx(float(np.polyfit(xs, ys, 1)[0]))


def test_minimum_detectable_effect_formula_and_power():
    mde = S.minimum_detectable_effect(3, 256, 0.3, 0.03)
    se = math.sqrt(0.03**2 / 3 + 0.3 / (3 * 256))
    assert mde == pytest.approx((1.959964 + 0.841621) * se, rel=1e-5)
    # simulated: a true effect of the MDE, estimated with that SE, is significant ~80% of the time
    rng = np.random.default_rng(4)
    z = rng.normal(mde, se, size=200_000) / se
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.01)
    assert S.minimum_detectable_effect(6, 256, 0.3, 0.03) < mde  # more seeds, smaller MDE
    with pytest.raises(ValueError, match="bad design"):
        S.minimum_detectable_effect(0, 10, 0.3, 0.0)


def test_seed_signs():
    assert S.seed_signs([[1, 0, 0], [0, -1, 0], [0, 0, 0]]) == [1, -1, 0]


def test_sign_flip_p_is_exact_on_a_case_with_a_known_answer():
    # 5 seeds all positive: only the all-plus and all-minus patterns reach |mean| -> p = 2 / 32
    d = [[1.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    assert S.sign_flip_p(d) == pytest.approx(2 / 32)
    # a reference by brute force over sign patterns on random data
    rng = np.random.default_rng(3)
    d = rng.normal(0.1, 1.0, size=(6, 7))
    m = d.mean(axis=1)
    count = 0
    for pattern in range(64):
        signs = np.array([1 if pattern >> i & 1 else -1 for i in range(6)])
        count += abs((signs * m).mean()) >= abs(m.mean()) - 1e-12
    assert S.sign_flip_p(d) == pytest.approx(count / 64)


def test_sign_flip_p_does_not_pool_problems_as_independent():
    # two seeds with large, opposite-free but tiny-seed-count effects: many problems cannot make p small
    d = np.ones((2, 500))
    assert S.sign_flip_p(d) == pytest.approx(0.5)
    assert S.mcnemar_exact(1000, 0) < 1e-100  # the pooled test would call this certain


def test_verdict_rules():
    I = S.Interval
    assert S.verdict(I(0.1, 0.05, 0.15, 0.95, 100), 0.01, 0.05) == "supported"
    assert S.verdict(I(0.1, 0.05, 0.15, 0.95, 100), 0.2, 0.05) == "inconclusive"
    assert S.verdict(I(0.0, -0.02, 0.03, 0.95, 100), 0.9, 0.05) == "refuted"
    assert S.verdict(I(0.0, -0.02, 0.07, 0.95, 100), 0.9, 0.05) == "inconclusive"
    assert S.verdict(I(-0.1, -0.15, -0.05, 0.95, 100), 0.01, 0.05) == "opposite"
    assert S.seed_sd([[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]) == pytest.approx(0.5)


def test_spearman_against_a_brute_force_rank_formula():
    # without ties rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    x, y = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0], [2.0, 7.0, 1.0, 8.0, 2.5, 0.5]
    rank = lambda v: [sorted(v).index(a) for a in v]  # noqa: E731
    d2 = sum((a - b) ** 2 for a, b in zip(rank(x), rank(y)))
    assert S.spearman(x, y) == pytest.approx(1 - 6 * d2 / (6 * 35))
    assert S.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share their average rank
    assert math.isnan(S.spearman([1, 1, 1], [1, 2, 3]))


def test_sign_flip_p_one_sided_known_answers():
    # every one of 5 seeds declines: only the identity pattern reaches the observed mean -> 1/32 (the plan's 0.031)
    d = [[1.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    assert S.sign_flip_p(d, alternative="greater") == pytest.approx(1 / 32)
    assert S.sign_flip_p(d, alternative="less") == pytest.approx(1.0)  # every pattern's -mean is >= -observed
    assert S.sign_flip_p(-np.asarray(d), alternative="less") == pytest.approx(1 / 32)
    # one seed against: patterns with mean >= observed, counted by brute force
    rng = np.random.default_rng(5)
    d = rng.normal(0.2, 1.0, size=(5, 9))
    m = d.mean(axis=1)
    count = sum((np.array([1 if p >> i & 1 else -1 for i in range(5)]) * m).mean() >= m.mean() - 1e-12 for p in range(32))
    assert S.sign_flip_p(d, alternative="greater") == pytest.approx(count / 32)
    with pytest.raises(ValueError, match="alternative"):
        S.sign_flip_p(d, alternative="bigger")


def test_fisher_combined_known_values():
    assert S.fisher_combined([0.3]) == pytest.approx(0.3)  # one p-value combines to itself
    # two p-values of 0.05: X = -4 ln 0.05 = 11.98, P(chi2_4 >= X) = e^{-X/2} (1 + X/2) = 0.0175
    x = -4 * math.log(0.05)
    assert S.fisher_combined([0.05, 0.05]) == pytest.approx(math.exp(-x / 2) * (1 + x / 2))
    assert S.fisher_combined([0.05, 0.05]) == pytest.approx(0.01747, abs=1e-5)
    assert S.fisher_combined([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert S.fisher_combined([0.0, 0.5]) == 0.0
    # against a Monte Carlo of the null: the combined p of uniform p-values is itself uniform
    rng = np.random.default_rng(0)
    combined = np.array([S.fisher_combined(rng.uniform(size=3)) for _ in range(4000)])
    assert abs(np.mean(combined < 0.05) - 0.05) < 0.012
    with pytest.raises(ValueError, match="p-values in"):
        S.fisher_combined([1.2])


def test_fisher_combined_mcnemar_combines_per_seed_exact_tests():
    # seed 0: only a right on 5 problems -> p = 2/32; seed 1: 3 vs 3 -> p = 1; seed 2: no discordant pair -> p = 1
    a = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0]]
    b = [[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0]]
    out = S.fisher_combined_mcnemar(a, b)
    assert [x["p"] for x in out["per_seed"]] == pytest.approx([2 / 32, 1.0, 1.0])
    assert (out["per_seed"][0]["n10"], out["per_seed"][0]["n01"]) == (5, 0)
    assert out["p"] == pytest.approx(S.fisher_combined([2 / 32, 1.0, 1.0]))
    assert out["p"] > 2 / 32  # two null seeds weaken the evidence of one
    with pytest.raises(ValueError, match="one shape"):
        S.fisher_combined_mcnemar([[1, 0]], [[1, 0, 1]])


def test_detectable_effect_generalises_the_binary_mde():
    assert S.detectable_effect(3, 256, 0.3, 0.03) == pytest.approx(S.minimum_detectable_effect(3, 256, 0.3, 0.03))
    z = 1.959963984540054 + 0.8416212335729143
    assert S.detectable_effect(5, 64, 1.5, 0.1) == pytest.approx(z * math.sqrt(0.1**2 / 5 + 1.5 / (5 * 64)))
    with pytest.raises(ValueError, match="bad design"):
        S.detectable_effect(5, 64, -1.0, 0.1)
