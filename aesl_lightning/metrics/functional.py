"""Diversity and evaluation metrics as pure functions: no state, no Lightning, no I/O.

- `self_bleu_batch`: self-BLEU of the k samples of each prompt, vectorised over prompts, with NLTK's BLEU-4
  (`sentence_bleu(refs, hyp, weights=(0.25,)*4, smoothing_function=SmoothingFunction().method1)`).
- `distinct_n_batch`: unique n-grams / total n-grams of each group of samples.
- `pass_at_k`: the unbiased pass@k estimator of Chen et al. (2021).
- `kl_divergence`: KL(p_theta || p_base) per token, chunked over tokens.
  (Token entropy is `aesl_lightning.ops.kernels.token_entropy`.)
The torchmetrics `Metric`s that accumulate them are in `aesl_lightning.metrics`.

Tokens: a sample is a sequence of hashable tokens (a list of ints or strings, a 1-D integer tensor or array)
or a `str`, which is split with `tokenize_text` (regex `\\w+|[^\\w\\s]`: runs of word characters, and every
other non-space character on its own). For another tokenisation, pass token lists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor

from aesl_lightning.ops.kernels import masked_rows, row_chunk

__all__ = ["Sample", "tokenize_text", "self_bleu_batch", "distinct_n_batch", "pass_at_k", "kl_divergence"]

Sample = Union[str, Sequence[Hashable], Tensor, np.ndarray]

BLEU_ORDER = 4
# Chen & Cherry (2014) smoothing method 1 (NLTK's default epsilon): a zero match count becomes 0.1.
SMOOTHING_EPSILON = 0.1
_TEXT_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize_text(text: str) -> list[str]:
    """Split text into runs of word characters and single punctuation marks (regex `\\w+|[^\\w\\s]`).

    "It's 3.5 km." -> ["It", "'", "s", "3", ".", "5", "km", "."]
    """
    return _TEXT_TOKEN.findall(text)


# ----------------------------------------------------------------------------------------------------------
# self-BLEU
# ----------------------------------------------------------------------------------------------------------


def self_bleu_batch(groups: Sequence[Sequence[Sample]]) -> list[float]:
    """Self-BLEU of every group (the k samples of one prompt), vectorised over all groups at once.

    Per group: SB = (1/k) sum_i BLEU4(s_i, {s_j : j != i}), where BLEU4 of a hypothesis h (|h| tokens)
    against references R is, for n = 1..4,
        m_n = sum over n-grams g of h of min(count_h(g), max_{r in R} count_r(g))   (clipped matches)
        d_n = max(1, |h| - n + 1)                                                    (hypothesis n-grams)
        p_n = m_n / d_n if m_n > 0 else 0.1 / d_n                                    (method 1, epsilon 0.1)
    BLEU4 = BP * exp(sum_n log(p_n) / 4), and 0 when m_1 = 0 (which includes |h| = 0);
    BP = 1 if |h| > r else exp(1 - r / |h|), with r the reference length closest to |h| (ties: the shorter).
    Edge cases: k < 2 -> NaN (no references; metrics skip such groups); an empty sample scores 0 (and, as a
    reference, has length 0 and no n-grams); k identical non-empty samples -> 1.0; samples shorter than 4
    tokens get p_n = 0.1 for the orders they lack (NLTK method 1), so e.g. 3 identical tokens score 0.1^(1/4).

    How (no Python loop over n-grams): tokens become dense ids 0..U-1; for each order n one sort of the
    integer keys (n-gram key) * num_tokens + position lines up equal n-grams of a group with their samples in
    order, so each count c_i(g) is a segment length. The n-gram keys are exact (the (n+1)-gram key is the id of
    its (group, n-gram prefix) run times U plus the next token: no hashing, no collisions). The clipping count
    of sample i is max_{j != i} c_j(g): the group's largest count, or its second largest (equal to the largest
    on a tie) where sample i holds the largest.
    """
    scores = [math.nan] * len(groups)
    keep = [g for g, group in enumerate(groups) if len(group) >= 2]
    if not keep:
        return scores
    tokens, lengths, group_of, vocab = _encode([groups[g] for g in keep], "self_bleu_batch")
    bleu = _bleu_vs_others(tokens, lengths, group_of, vocab)
    num_groups = len(keep)
    means = np.bincount(group_of, weights=bleu, minlength=num_groups) / np.bincount(group_of, minlength=num_groups)
    for g, value in zip(keep, means.tolist()):
        scores[g] = value
    return scores



def _encode(groups: Sequence[Sequence[Sample]], caller: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """All samples as one flat int64 array of token ids in 0..U-1, their lengths, their group index, and U."""
    samples: list[Any] = []
    group_of: list[int] = []
    for g, group in enumerate(groups):
        if isinstance(group, str) or (isinstance(group, (Tensor, np.ndarray)) and group.ndim != 2):
            raise ValueError(f"{caller}: groups[{g}] must be a sequence of samples (or a 2-D array of token ids), found {type(group).__name__}")
        for i, sample in enumerate(group):
            if isinstance(sample, str):
                sample = tokenize_text(sample)
            elif isinstance(sample, Tensor):
                sample = sample.detach().cpu().numpy()
            if isinstance(sample, np.ndarray):
                if sample.ndim != 1:
                    raise ValueError(f"{caller}: groups[{g}][{i}] must be a 1-D sequence of token ids, found shape {list(sample.shape)}")
                if sample.dtype.kind not in "iu":
                    sample = sample.tolist()
            else:
                sample = list(sample)
            samples.append(sample)
            group_of.append(g)
    lengths = np.array([len(s) for s in samples], dtype=np.int64)
    flat_lists = [tok for s in samples if isinstance(s, list) for tok in s]
    as_ints = np.array(flat_lists) if flat_lists else np.zeros(0, dtype=np.int64)
    if as_ints.ndim == 1 and as_ints.dtype.kind in "iu":
        parts, offset = [], 0
        for s in samples:
            if isinstance(s, list):
                parts.append(as_ints[offset : offset + len(s)].astype(np.int64, copy=False))
                offset += len(s)
            else:
                parts.append(s.astype(np.int64, copy=False))
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        tokens, vocab = _dense_ids(flat)
    else:
        # Strings or other hashables (compared with ==, as NLTK does): ids by first appearance.
        ids: dict[Hashable, int] = {}
        tokens = np.array(
            [ids.setdefault(tok, len(ids)) for s in samples for tok in (s if isinstance(s, list) else s.tolist())],
            dtype=np.int64,
        )
        vocab = max(len(ids), 1)
    return tokens, lengths, np.array(group_of, dtype=np.int64), vocab


def _dense_ids(flat: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer tokens mapped to 0..U-1 (order kept), and U."""
    if flat.size == 0:
        return flat.astype(np.int64), 1
    low, high = int(flat.min()), int(flat.max())
    if high - low < max(1 << 20, 4 * flat.size):  # a lookup table is cheaper than sorting
        shifted = (flat - low).astype(np.int64)
        present = np.zeros(high - low + 1, dtype=np.int64)
        present[shifted] = 1
        rank = np.cumsum(present) - 1
        return rank[shifted], int(rank[-1]) + 1
    unique, inverse = np.unique(flat, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), int(unique.size)


_KEY_LIMIT = 1 << 62


def _ngram_keys(tokens: np.ndarray, lengths: np.ndarray, vocab: int, max_order: int):
    """Yield (n, sample, key, num_keys) for n = 1..max_order: the n-grams of every sample.

    sample[j] is the sample of the j-th n-gram and key[j] in 0..num_keys-1 identifies it (equal keys <=>
    equal n-grams); n-grams never cross sample boundaries.
    """
    sample_of = np.repeat(np.arange(lengths.size), lengths)
    room = np.repeat(np.cumsum(lengths), lengths) - np.arange(tokens.size)  # tokens from p to the end of its sample
    keys, num_keys = tokens, vocab  # keys[p]: the (n-1)-gram starting at p, where room[p] >= n-1
    for n in range(1, max_order + 1):
        start = np.flatnonzero(room >= n)
        if n > 1:
            prefix = keys[start]
            if num_keys * vocab >= _KEY_LIMIT:
                _, prefix = np.unique(prefix, return_inverse=True)
                prefix = prefix.reshape(-1)
                num_keys = int(prefix.max()) + 1 if prefix.size else 1
            keys = np.full_like(tokens, -1)
            keys[start] = prefix * vocab + tokens[start + n - 1]
            num_keys *= vocab
        yield n, sample_of[start], keys[start], num_keys


def _rank(keys: np.ndarray, num_keys: int, factor: int) -> tuple[np.ndarray, int]:
    """Keys re-ranked to 0..K-1 if num_keys * factor could overflow int64, else unchanged."""
    if num_keys * factor < _KEY_LIMIT:
        return keys, num_keys
    _, ranked = np.unique(keys, return_inverse=True)
    return ranked.reshape(-1), int(ranked.max()) + 1 if ranked.size else 1


def _bleu_vs_others(tokens: np.ndarray, lengths: np.ndarray, group_of: np.ndarray, vocab: int) -> np.ndarray:
    """BLEU-4 (float64) of every sample against the other samples of its group (every group has k >= 2).

    Order n sorts the keys (n-gram key) * num_tokens + position: equal n-grams become runs, split where the
    group changes, and within a run positions (hence samples) ascend, so each sample's occurrences form a
    segment whose length is its count. An (n+1)-gram can only match another sample if both its n-grams
    (at p and p+1) occur in two samples of the group, so only such positions go on to order n+1, keyed by
    (id of the (group, n-gram) run at p) * U + next token: exact, and most random n-grams drop out early.
    """
    num_samples, num_tokens = lengths.size, tokens.size
    sample_of = np.repeat(np.arange(num_samples), lengths)
    group_at = group_of[sample_of]
    room = np.repeat(np.cumsum(lengths), lengths) - np.arange(num_tokens)  # tokens from p to the end of its sample
    length = lengths.astype(np.float64)
    log_precision = np.zeros(num_samples)
    unigram_matches = np.zeros(num_samples)
    positions, keys, num_keys = np.arange(num_tokens), tokens, vocab
    for n in range(1, BLEU_ORDER + 1):
        matches = np.zeros(num_samples)
        if positions.size:
            keys, num_keys = _rank(keys, num_keys, num_tokens)
            key, position = np.divmod(np.sort(keys * num_tokens + positions), num_tokens)
            sample, group = sample_of[position], group_at[position]
            run_start = np.r_[True, (key[1:] != key[:-1]) | (group[1:] != group[:-1])]
            segment = np.flatnonzero(run_start | np.r_[True, sample[1:] != sample[:-1]])
            count = np.diff(np.r_[segment, key.size])
            run_of = np.cumsum(run_start) - 1  # run index of every sorted element
            first = np.flatnonzero(run_start[segment])  # each run's first segment
            segment_run = run_of[segment]
            largest = np.maximum.reduceat(count, first)
            is_largest = count == largest[segment_run]
            largest_twice = np.add.reduceat(is_largest.astype(np.int64), first) >= 2
            runner_up = np.where(largest_twice, largest, np.maximum.reduceat(np.where(is_largest, 0, count), first))
            others = np.where(is_largest, runner_up[segment_run], largest[segment_run])  # max over the other samples
            matches = np.bincount(sample[segment], weights=np.minimum(count, others), minlength=num_samples)
            if n < BLEU_ORDER:
                shared = np.diff(np.r_[first, segment.size]) >= 2  # run held by >= 2 samples
                run_id = np.full(num_tokens, -1)
                run_id[position] = np.where(shared[run_of], run_of, -1)
                alive = (room > n) & (run_id >= 0) & np.r_[run_id[1:] >= 0, False]
                positions = np.flatnonzero(alive)
                keys, num_keys = run_id[positions] * vocab + tokens[positions + n], (int(run_of[-1]) + 1) * vocab
        if n == 1:
            unigram_matches = matches
        log_precision += np.log(np.where(matches > 0, matches, SMOOTHING_EPSILON) / np.maximum(length - n + 1, 1))
    closest = _closest_other_length(lengths, group_of).astype(np.float64)
    brevity = np.where(length > closest, 1.0, np.exp(1.0 - closest / np.maximum(length, 1)))
    return np.where(unigram_matches > 0, brevity * np.exp(log_precision / BLEU_ORDER), 0.0)


def _closest_other_length(lengths: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """For each sample, the length of the other sample of its group closest to its own (ties: the shorter).

    In each group sorted by length, the closest other length is that of a sorted neighbour.
    """
    order = np.lexsort((lengths, group_of))
    ls, gs = lengths[order], group_of[order]
    same_as_prev = np.r_[False, gs[1:] == gs[:-1]]
    same_as_next = np.r_[gs[1:] == gs[:-1], False]
    prev_len, next_len = np.r_[ls[:1], ls[:-1]], np.r_[ls[1:], ls[-1:]]
    take_prev = same_as_prev & (~same_as_next | (ls - prev_len <= next_len - ls))
    closest = np.empty_like(lengths)
    closest[order] = np.where(take_prev, prev_len, next_len)
    return closest



# ----------------------------------------------------------------------------------------------------------
# distinct-n and pass@k
# ----------------------------------------------------------------------------------------------------------


def distinct_n_batch(groups: Sequence[Sequence[Sample]], n: int) -> list[float]:
    """distinct-n of every group: |unique n-grams| / |n-grams|, n-grams taken within each sample of the group.

    0.0 for a group without any n-gram (all samples shorter than n, or no samples). Vectorised: one
    `np.unique` over (group, n-gram key) pairs.
    """
    if n < 1:
        raise ValueError(f"distinct_n_batch: n must be >= 1, found {n}")
    if not groups:
        return []
    tokens, lengths, group_of, vocab = _encode(groups, "distinct_n_batch")
    *_, (_, sample, key, num_keys) = _ngram_keys(tokens, lengths, vocab, n)
    group = group_of[sample]
    key, num_keys = _rank(key, num_keys, len(groups))
    total = np.bincount(group, minlength=len(groups))
    distinct = np.bincount(np.unique(group * num_keys + key) // num_keys, minlength=len(groups))
    return (distinct / np.maximum(total, 1)).tolist()



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
    rows = masked_rows(logits, mask, "kl_divergence")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    kl = torch.zeros(flat.shape[0], dtype=acc, device=logits.device)
    for chunk in rows.split(chunk_size or row_chunk(vocab)):
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
