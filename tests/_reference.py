"""Slow, obvious reference implementations that the tests compare the vectorised library code against."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

BLEU_ORDER = 4
SMOOTHING_EPSILON = 0.1  # Chen & Cherry (2014) method 1, NLTK's default epsilon


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return list(zip(*(tokens[i:] for i in range(n))))


def sentence_bleu4(hypothesis: Sequence[Hashable], references: Sequence[Sequence[Hashable]]) -> float:
    """Sentence BLEU-4 with uniform weights, smoothing method 1 and the brevity penalty (NLTK's definition).

    With h the hypothesis (|h| tokens), R the references, and for n = 1..4
        m_n = sum over n-grams g of h of min(count_h(g), max_{r in R} count_r(g))   (clipped matches)
        d_n = max(1, |h| - n + 1)                                                    (hypothesis n-grams)
        p_n = m_n / d_n if m_n > 0 else 0.1 / d_n                                    (method 1, epsilon 0.1)
    BLEU = BP * exp(sum_n log(p_n) / 4), and BLEU = 0 when m_1 = 0 (which includes |h| = 0).
    BP = 1 if |h| > r else exp(1 - r / |h|), with r the reference length closest to |h| (ties: the shorter).
    """
    hyp, refs = list(hypothesis), [list(ref) for ref in references]
    if not refs:
        raise ValueError("sentence_bleu4: expected at least one reference, found none")
    if not hyp:
        return 0.0
    log_precision = 0.0
    for n in range(1, BLEU_ORDER + 1):
        hyp_counts = Counter(_ngrams(hyp, n))
        max_ref_counts: Counter = Counter()
        for ref in refs:
            max_ref_counts |= Counter(_ngrams(ref, n))  # `|` keeps the larger count of each n-gram
        matches = sum((hyp_counts & max_ref_counts).values())  # `&` keeps the smaller: clipping
        if n == 1 and matches == 0:
            return 0.0
        log_precision += math.log((matches if matches > 0 else SMOOTHING_EPSILON) / max(1, len(hyp) - n + 1))
    closest = min((len(ref) for ref in refs), key=lambda length: (abs(length - len(hyp)), length))
    brevity = 1.0 if len(hyp) > closest else math.exp(1.0 - closest / len(hyp))
    return brevity * math.exp(log_precision / BLEU_ORDER)


def self_bleu(samples: Sequence[Sequence[Hashable]]) -> float:
    """(1/k) sum_i sentence_bleu4(s_i, [s_j for j != i]); NaN when k < 2."""
    if len(samples) < 2:
        return math.nan
    return sum(sentence_bleu4(s, list(samples[:i]) + list(samples[i + 1 :])) for i, s in enumerate(samples)) / len(samples)


def distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float:
    """|unique n-grams| / |n-grams| over the samples (n-grams within each sample); 0.0 without any n-gram."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
