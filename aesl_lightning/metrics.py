"""Diversity and evaluation metrics: pure functions for the maths, torchmetrics Metrics for accumulation.

Pure functions (no state, no Lightning):
- `sentence_bleu4`: BLEU-4 of one hypothesis against references, equal to NLTK's
  `sentence_bleu(refs, hyp, weights=(0.25,)*4, smoothing_function=SmoothingFunction().method1)`.
- `self_bleu`, `self_bleu_batch`: self-BLEU of the k samples of a prompt (vectorised over prompts).
- `distinct_n`, `distinct_n_batch`: unique n-grams / total n-grams of a group of samples.
- `pass_at_k`: the unbiased pass@k estimator of Chen et al. (2021).
- `kl_divergence`: KL(p_theta || p_base) per token, chunked over tokens.
  (Token entropy is `aesl_lightning.losses.token_entropy`.)

Metrics (states are sums and counts with `dist_reduce_fx="sum"`, so a DDP sync is exact):
`TokenEntropy`, `SelfBLEU`, `DistinctN`, `PassAtK`, `KLToBase`. A metric that has counted nothing computes NaN.

Tokens: a sample is a sequence of hashable tokens (a list of ints or strings, a 1-D integer tensor or array)
or a `str`, which is split with `tokenize_text` (regex `\\w+|[^\\w\\s]`: runs of word characters, and every
other non-space character on its own). For another tokenisation, pass token lists.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from aesl_lightning.losses import token_entropy

__all__ = [
    "tokenize_text",
    "sentence_bleu4",
    "self_bleu",
    "self_bleu_batch",
    "distinct_n",
    "distinct_n_batch",
    "pass_at_k",
    "kl_divergence",
    "TokenEntropy",
    "SelfBLEU",
    "DistinctN",
    "PassAtK",
    "KLToBase",
]

Sample = Union[str, Sequence[Hashable], Tensor, np.ndarray]

BLEU_ORDER = 4
# Chen & Cherry (2014) smoothing method 1 (NLTK's default epsilon): a zero match count becomes 0.1.
SMOOTHING_EPSILON = 0.1
# Rows of [rows x V] logits per chunk when no chunk size is given (~1 MiB of float32 per operand).
_CHUNK_ELEMS = 1 << 18
_TEXT_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize_text(text: str) -> list[str]:
    """Split text into runs of word characters and single punctuation marks (regex `\\w+|[^\\w\\s]`).

    "It's 3.5 km." -> ["It", "'", "s", "3", ".", "5", "km", "."]
    """
    return _TEXT_TOKEN.findall(text)


def _as_tokens(sample: Sample, where: str) -> list[Hashable]:
    if isinstance(sample, str):
        return tokenize_text(sample)
    if isinstance(sample, (Tensor, np.ndarray)):
        if sample.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D sequence of token ids, found shape {list(sample.shape)}")
        return sample.tolist()
    return list(sample)


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return list(zip(*(tokens[i:] for i in range(n))))


# ----------------------------------------------------------------------------------------------------------
# BLEU-4 and self-BLEU
# ----------------------------------------------------------------------------------------------------------


def sentence_bleu4(hypothesis: Sample, references: Sequence[Sample]) -> float:
    """Sentence BLEU-4 with uniform weights, smoothing method 1 and the brevity penalty (NLTK's definition).

    With h the hypothesis (|h| tokens), R the references, and for n = 1..4
        m_n = sum over n-grams g of h of min(count_h(g), max_{r in R} count_r(g))   (clipped matches)
        d_n = max(1, |h| - n + 1)                                                    (hypothesis n-grams)
        p_n = m_n / d_n if m_n > 0 else 0.1 / d_n                                    (method 1, epsilon 0.1)
    BLEU = BP * exp(sum_n log(p_n) / 4), and BLEU = 0 when m_1 = 0 (which includes |h| = 0).
    BP = 1 if |h| > r else exp(1 - r / |h|), with r the reference length closest to |h| (ties: the shorter).
    A hypothesis shorter than n has no n-grams: m_n = 0, d_n = 1, p_n = 0.1.
    Raises ValueError without references (NLTK raises too).
    """
    hyp = _as_tokens(hypothesis, "sentence_bleu4: hypothesis")
    refs = [_as_tokens(ref, f"sentence_bleu4: references[{i}]") for i, ref in enumerate(references)]
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


def self_bleu(samples: Sequence[Sample]) -> float:
    """Self-BLEU of the k samples of one prompt: (1/k) sum_i sentence_bleu4(s_i, [s_j for j != i]).

    NaN when k < 2 (no references). See `self_bleu_batch` for the edge cases.
    """
    return self_bleu_batch([samples])[0]


def self_bleu_batch(groups: Sequence[Sequence[Sample]]) -> list[float]:
    """`self_bleu` of every group (the k samples of one prompt), vectorised over all groups at once.

    Per group: SB = (1/k) sum_i BLEU4(s_i, {s_j : j != i}) with `sentence_bleu4`'s definition.
    Edge cases: k < 2 -> NaN (no references; metrics skip such groups); an empty sample scores 0 (and, as a
    reference, has length 0 and no n-grams); k identical non-empty samples -> 1.0; samples shorter than 4
    tokens get p_n = 0.1 for the orders they lack (NLTK method 1), so e.g. 3 identical tokens score 0.1^(1/4).

    How: tokens are mapped to dense ids; the id of an n-gram is the dense rank of (id of its (n-1)-gram
    prefix, last token), so n-gram ids are exact (no hashing, no collisions). Counts per (sample, n-gram)
    come from `torch.unique`; for each (group, n-gram) the largest and second-largest count over the group's
    samples give the clipping count of sample i over the others: the largest, unless sample i holds it,
    then the second largest (equal to the largest on a tie).
    """
    scores = [math.nan] * len(groups)
    keep = [g for g, group in enumerate(groups) if len(group) >= 2]
    if not keep:
        return scores
    tokens, lengths, group_of = _encode([groups[g] for g in keep], "self_bleu_batch")
    bleu = _bleu_vs_others(tokens, lengths, group_of)
    num_groups = len(keep)
    totals = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_of, bleu)
    sizes = torch.bincount(group_of, minlength=num_groups).to(torch.float64)
    for g, value in zip(keep, (totals / sizes).tolist()):
        scores[g] = value
    return scores


def _encode(groups: Sequence[Sequence[Sample]], caller: str) -> tuple[Tensor, Tensor, Tensor]:
    """All samples as one flat tensor of dense token ids (0..U-1), their lengths, and their group index."""
    samples: list[Any] = []
    group_of: list[int] = []
    for g, group in enumerate(groups):
        if isinstance(group, str) or (isinstance(group, Tensor) and group.ndim != 2):
            raise ValueError(f"{caller}: groups[{g}] must be a sequence of samples (or a 2-D tensor), found {type(group).__name__}")
        for i, sample in enumerate(group):
            where = f"{caller}: groups[{g}][{i}]"
            if isinstance(sample, str):
                sample = tokenize_text(sample)
            elif isinstance(sample, np.ndarray):
                sample = torch.from_numpy(sample)
            if isinstance(sample, Tensor):
                if sample.ndim != 1:
                    raise ValueError(f"{where}: expected a 1-D sequence of token ids, found shape {list(sample.shape)}")
                if sample.dtype.is_floating_point or sample.dtype.is_complex or sample.dtype == torch.bool:
                    sample = sample.tolist()
                else:
                    sample = sample.detach().to("cpu", torch.int64)
            else:
                sample = list(sample)
            samples.append(sample)
            group_of.append(g)
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.int64)
    flat_lists = [tok for s in samples if isinstance(s, list) for tok in s]
    as_ints: Tensor | None = None
    try:
        as_ints = torch.tensor(flat_lists) if flat_lists else torch.zeros(0, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        as_ints = None
    if as_ints is not None and as_ints.ndim == 1 and not (as_ints.is_floating_point() or as_ints.is_complex() or as_ints.dtype == torch.bool):
        as_ints = as_ints.to(torch.int64)
        parts, offset = [], 0
        for s in samples:
            if isinstance(s, list):
                parts.append(as_ints[offset : offset + len(s)])
                offset += len(s)
            else:
                parts.append(s)
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        _, dense = torch.unique(flat, return_inverse=True)
    else:
        # Strings or other hashables: ids by first appearance; ints from tensors hash like python ints.
        vocab: dict[Hashable, int] = {}
        dense = torch.tensor(
            [vocab.setdefault(tok, len(vocab)) for s in samples for tok in (s if isinstance(s, list) else s.tolist())],
            dtype=torch.int64,
        )
    return dense.reshape(-1), lengths, torch.tensor(group_of, dtype=torch.int64)


def _ngram_ids(tokens: Tensor, lengths: Tensor, max_order: int):
    """Yield (n, start, sample, ngram_id, num_ids) for n = 1..max_order over the flat token tensor.

    start: flat positions where an n-gram begins inside its sample; ngram_id: dense id in 0..num_ids-1, equal
    ids <=> equal n-grams.
    """
    sample_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(tokens.numel()) - offsets[sample_of]
    room = lengths[sample_of] - position  # tokens from this position to the end of its sample
    vocab = int(tokens.max()) + 1 if tokens.numel() else 1
    ids = tokens  # ids of the (n-1)-grams starting at each flat position (valid where room >= n-1)
    for n in range(1, max_order + 1):
        start = (room >= n).nonzero().squeeze(1)
        if n == 1:
            ngram, num_ids = tokens[start], vocab
        else:
            keys = ids[start] * vocab + tokens[start + n - 1]
            unique_keys, ngram = torch.unique(keys, return_inverse=True)
            num_ids = unique_keys.numel()
        yield n, start, sample_of[start], ngram, num_ids
        ids = torch.full_like(tokens, -1).index_put_((start,), ngram)


def _bleu_vs_others(tokens: Tensor, lengths: Tensor, group_of: Tensor) -> Tensor:
    """BLEU-4 (float64) of every sample against the other samples of its group (every group has k >= 2)."""
    num_samples = lengths.numel()
    length = lengths.to(torch.float64)
    log_precision = torch.zeros(num_samples, dtype=torch.float64)
    unigram_matches = torch.zeros(num_samples, dtype=torch.int64)
    for n, _, sample, ngram, num_ids in _ngram_ids(tokens, lengths, BLEU_ORDER):
        matches = torch.zeros(num_samples, dtype=torch.int64)
        if sample.numel():
            # count of every (sample, n-gram) present
            pair, count = torch.unique(sample * num_ids + ngram, return_counts=True)
            pair_sample, pair_ngram = pair // num_ids, pair % num_ids
            group_ngram = group_of[pair_sample] * num_ids + pair_ngram
            # sort by (group, n-gram), count descending: each run starts with its largest count
            order = torch.argsort(count, descending=True, stable=True)
            order = order[torch.argsort(group_ngram[order], stable=True)]
            group_ngram, count, pair_sample = group_ngram[order], count[order], pair_sample[order]
            run_start = torch.ones_like(group_ngram, dtype=torch.bool)
            run_start[1:] = group_ngram[1:] != group_ngram[:-1]
            run = torch.cumsum(run_start, 0) - 1
            starts = run_start.nonzero().squeeze(1)
            first = count[starts]
            after = (starts + 1).clamp(max=count.numel() - 1)
            second = torch.where((starts + 1 < count.numel()) & ~run_start[after], count[after], 0)
            largest, runner_up = first[run], second[run]
            # max over the other samples: the largest unless this sample holds it (ties: runner_up == largest)
            others = torch.where(count == largest, runner_up, largest)
            matches.index_add_(0, pair_sample, torch.minimum(count, others))
        if n == 1:
            unigram_matches = matches
        denominator = (length - n + 1).clamp(min=1)
        numerator = torch.where(matches > 0, matches.to(torch.float64), SMOOTHING_EPSILON)
        log_precision += torch.log(numerator / denominator)
    closest = _closest_other_length(lengths, group_of).to(torch.float64)
    brevity = torch.where(length > closest, 1.0, torch.exp(1.0 - closest / length.clamp(min=1)))
    return torch.where(unigram_matches > 0, brevity * torch.exp(log_precision / BLEU_ORDER), 0.0)


def _closest_other_length(lengths: Tensor, group_of: Tensor) -> Tensor:
    """For each sample, the length of the other sample of its group closest to its own (ties: the shorter).

    In each group sorted by length, the closest other length is that of a sorted neighbour.
    """
    order = torch.argsort(group_of * (int(lengths.max()) + 1) + lengths)
    ls, gs = lengths[order], group_of[order]
    n = ls.numel()
    prev_idx, next_idx = (torch.arange(n) - 1).clamp(min=0), (torch.arange(n) + 1).clamp(max=n - 1)
    has_prev = (torch.arange(n) > 0) & (gs[prev_idx] == gs)
    has_next = (torch.arange(n) < n - 1) & (gs[next_idx] == gs)
    take_prev = has_prev & (~has_next | (ls - ls[prev_idx] <= ls[next_idx] - ls))
    closest = torch.empty_like(lengths)
    closest[order] = torch.where(take_prev, ls[prev_idx], ls[next_idx])
    return closest


# ----------------------------------------------------------------------------------------------------------
# distinct-n and pass@k
# ----------------------------------------------------------------------------------------------------------


def distinct_n(samples: Sequence[Sample], n: int) -> float:
    """distinct-n of a set of samples: |unique n-grams| / |n-grams|, n-grams taken within each sample.

    0.0 when the samples hold no n-gram (all shorter than n, or no samples).
    """
    return distinct_n_batch([samples], n)[0]


def distinct_n_batch(groups: Sequence[Sequence[Sample]], n: int) -> list[float]:
    """`distinct_n` of every group, vectorised: one `torch.unique` over (group, n-gram id) pairs."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, found {n}")
    scores = [0.0] * len(groups)
    if not groups:
        return scores
    tokens, lengths, group_of = _encode(groups, "distinct_n")
    if tokens.numel() == 0:
        return scores
    *_, (_, _, sample, ngram, num_ids) = _ngram_ids(tokens, lengths, n)
    if sample.numel() == 0:
        return scores
    group = group_of[sample]
    total = torch.bincount(group, minlength=len(groups))
    unique_pairs = torch.unique(group * num_ids + ngram)
    distinct = torch.bincount(unique_pairs // num_ids, minlength=len(groups))
    ratio = torch.where(total > 0, distinct.to(torch.float64) / total.clamp(min=1), 0.0)
    return ratio.tolist()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms a large binomial. Returns 0 when c = 0
    and 1 when n - c < k (every k-subset holds a correct sample). Raises ValueError unless 1 <= k <= n and
    0 <= c <= n.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], found k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c (correct samples) must be in [0, n={n}], found c={c}")
    if n - c < k:
        return 1.0
    survive = 1.0
    for i in range(n - c + 1, n + 1):
        survive *= 1.0 - k / i
    return 1.0 - survive


# ----------------------------------------------------------------------------------------------------------
# KL to the base model
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def kl_divergence(
    logits: Tensor,
    base_logits: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """KL(p_theta || p_base) = sum_v p_theta(v) (log p_theta(v) - log p_base(v)) per row, in nats; no gradient.

    `logits [..., V]` are the model's (p_theta), `base_logits [..., V]` the base model's, as logits or as
    log-probabilities (log_softmax leaves log-probabilities unchanged). This direction is the forgetting of
    the base distribution measured under the model's own predictions. No shifting: `mask [...]` selects the
    rows that count (None: all). Rows are processed `chunk_size` at a time (default ~1 MiB of float32 per
    chunk). reduction "mean" averages over the selected rows (NaN when none), "sum" adds them up, "none"
    returns [...] with 0 on unselected rows.
    """
    if base_logits.shape != logits.shape:
        raise ValueError(f"kl_divergence: base_logits must have the logits' shape {list(logits.shape)}, found {list(base_logits.shape)}")
    vocab = logits.shape[-1]
    flat, flat_base = logits.reshape(-1, vocab), base_logits.reshape(-1, vocab)
    if mask is None:
        rows = torch.arange(flat.shape[0], device=logits.device)
    else:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"kl_divergence: mask must have shape {list(logits.shape[:-1])} (logits without the vocab axis), found {list(mask.shape)}")
        rows = mask.reshape(-1).nonzero().squeeze(1)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    kl = torch.zeros(flat.shape[0], dtype=acc, device=logits.device)
    for chunk in rows.split(chunk_size or max(1, _CHUNK_ELEMS // vocab)):
        logp = torch.log_softmax(flat.index_select(0, chunk).to(acc), dim=-1)
        logq = torch.log_softmax(flat_base.index_select(0, chunk).to(acc), dim=-1)
        # p = 0 contributes 0 even where log q = -inf
        kl.index_copy_(0, chunk, torch.where(logp > -math.inf, logp.exp() * (logp - logq), 0.0).sum(-1))
    if reduction == "none":
        return kl.view(logits.shape[:-1])
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.sum() / rows.numel() if rows.numel() else kl.new_tensor(math.nan)
    raise ValueError(f"kl_divergence: reduction must be 'mean', 'sum' or 'none', found {reduction!r}")


# ----------------------------------------------------------------------------------------------------------
# torchmetrics Metrics
# ----------------------------------------------------------------------------------------------------------


class _SumCountMetric(Metric):
    """A mean kept as a float64 sum and a count, both summed across processes (an exact sync)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add(self, total: Tensor | float, count: Tensor | int) -> None:
        self.total += torch.as_tensor(total, dtype=torch.float64, device=self.total.device)
        self.count += torch.as_tensor(count, dtype=torch.int64, device=self.count.device)

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

    def update(self, logits: Tensor, mask: Tensor | None = None) -> None:
        total = token_entropy(logits.detach(), mask, chunk_size=self.chunk_size, reduction="sum")
        self._add(total, logits.shape[:-1].numel() if mask is None else mask.sum())

    def update_from_values(self, entropy: Tensor, mask: Tensor | None = None) -> None:
        entropy = entropy.detach().to(torch.float64)
        if mask is None:
            self._add(entropy.sum(), entropy.numel())
            return
        if mask.shape != entropy.shape:
            raise ValueError(f"TokenEntropy.update_from_values: mask must have the entropy's shape {list(entropy.shape)}, found {list(mask.shape)}")
        self._add(torch.where(mask.bool(), entropy, 0.0).sum(), mask.bool().sum())


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
    """Mean over prompt groups of `distinct_n(group, n)`: unique / total n-grams among a prompt's k samples.

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
        self.total += torch.tensor(totals, dtype=torch.float64, device=self.total.device)
        self.count += torch.tensor(counts, dtype=torch.int64, device=self.count.device)

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
