"""Metrics against slow references: NLTK's sentence_bleu and `_reference`, brute-force pass@k, torch.distributions."""

from __future__ import annotations

import itertools
import math
import os
import random
import socket
import tempfile
from fractions import Fraction

import numpy as np
import pytest
import torch
from _reference import distinct_n, self_bleu, sentence_bleu4

from aesl_lightning.metrics import DistinctN, KLToBase, PassAtK, SelfBLEU, TokenEntropy
from aesl_lightning.metrics.functional import distinct_n_batch, kl_divergence, pass_at_k, self_bleu_batch, tokenize_text

bleu_score = pytest.importorskip("nltk.translate.bleu_score")
SMOOTH = bleu_score.SmoothingFunction().method1

TEXTS = [
    "The cat sat on the mat . The cat is happy .",
    "A cat sat on a mat , and the cat was happy !",
    "the cat sat on the mat",
    "Dogs run in the park every morning .",
    "The cat sat on the mat . The cat is happy .",
    "cat",
    "",
    "the the the the the the",
    "On the mat sat the cat ; happy it was .",
]


def nltk_bleu(hypothesis, references) -> float:
    return float(bleu_score.sentence_bleu(references, hypothesis, weights=(0.25,) * 4, smoothing_function=SMOOTH))


def nltk_self_bleu(samples) -> float:
    if len(samples) < 2:
        return math.nan
    return sum(nltk_bleu(h, samples[:i] + samples[i + 1 :]) for i, h in enumerate(samples)) / len(samples)


def random_groups(rng: random.Random, num_groups: int, ks=(2, 3, 5)) -> list[list[list[int]]]:
    """Token-id groups with lengths 0..40 over small vocabularies; a third of the groups are repetitive
    (samples copy a shared template with 20% of tokens resampled, or loop a short phrase)."""
    groups = []
    for _ in range(num_groups):
        vocab = rng.choice([1, 2, 3, 5, 12, 50])
        max_len = rng.choice([3, 10, 40])
        k = rng.choice(ks)
        if rng.random() < 2 / 3:
            groups.append([[rng.randrange(vocab) for _ in range(rng.randint(0, max_len))] for _ in range(k)])
            continue
        template = [rng.randrange(vocab) for _ in range(max_len)]
        group = []
        for _ in range(k):
            if rng.random() < 0.5:
                group.append([t if rng.random() < 0.8 else rng.randrange(vocab) for t in template[: rng.randint(0, max_len)]])
            else:
                phrase = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
                group.append((phrase * max_len)[: rng.randint(0, max_len)])
        groups.append(group)
    return groups


# ----------------------------------------------------------------------------------------------------------
# BLEU-4 and self-BLEU
# ----------------------------------------------------------------------------------------------------------


# `sentence_bleu4` is the slow reference (tests/_reference.py): first pinned to NLTK and to hand values, then
# the vectorised `self_bleu_batch` is compared against it.


def test_reference_bleu4_matches_nltk_on_random_token_ids():
    rng = random.Random(0)
    for group in random_groups(rng, 300):
        hypothesis, references = group[0], group[1:]
        assert sentence_bleu4(hypothesis, references) == pytest.approx(nltk_bleu(hypothesis, references), abs=1e-6)


def test_reference_bleu4_matches_nltk_on_text():
    tokenised = [tokenize_text(t) for t in TEXTS]
    for i, hypothesis in enumerate(tokenised):
        references = tokenised[:i] + tokenised[i + 1 :]
        expected = nltk_bleu(hypothesis, references)
        assert sentence_bleu4(hypothesis, references) == pytest.approx(expected, abs=1e-6)


def test_reference_bleu4_hand_values():
    # short hypothesis: p1 = p2 = p3 = 1, no 4-gram -> p4 = 0.1 / 1
    assert sentence_bleu4([5, 5, 5], [[5, 5, 5]]) == pytest.approx(0.1**0.25, abs=1e-12)
    assert sentence_bleu4([7], [[7]]) == pytest.approx(0.1**0.75, abs=1e-12)
    # no unigram match, or an empty hypothesis: 0
    assert sentence_bleu4([1, 2, 3, 4], [[5, 6, 7, 8]]) == 0.0
    assert sentence_bleu4([], [[1, 2]]) == 0.0
    # brevity penalty: lengths 3 and 5 are equally close to 4 -> the shorter (3) -> no penalty
    hyp = [1, 2, 3, 4]
    refs = [[1, 2, 3], [1, 2, 3, 4, 9]]
    assert sentence_bleu4(hyp, refs) == pytest.approx(1.0, abs=1e-12)  # (the longer, 5, would give exp(-1/4))
    assert nltk_bleu(hyp, refs) == pytest.approx(1.0, abs=1e-12)
    # shorter than the closest reference: BP = exp(1 - 5/4)
    assert sentence_bleu4(hyp, [[1, 2, 3, 4, 9]]) == pytest.approx(math.exp(1 - 5 / 4), abs=1e-12)
    # clipping by the largest count in any single reference: "the" x 6 against refs with 2 and 1 "the"
    the = ["the"] * 6
    assert sentence_bleu4(the, [["the", "cat", "the"], ["the"]]) == pytest.approx(nltk_bleu(the, [["the", "cat", "the"], ["the"]]), abs=1e-12)
    with pytest.raises(ValueError, match="at least one reference"):
        sentence_bleu4([1, 2], [])


def test_self_bleu_batch_matches_nltk_loop():
    rng = random.Random(1)
    groups = random_groups(rng, 200, ks=(0, 1, 2, 3, 5))
    got = self_bleu_batch(groups)
    assert len(got) == len(groups)
    for group, value in zip(groups, got):
        expected = nltk_self_bleu(group)
        if math.isnan(expected):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(expected, abs=1e-6)
    # the slow reference, and one prompt at a time, give the same numbers as the batch
    assert [self_bleu(g) for g in groups] == pytest.approx(got, abs=1e-12, nan_ok=True)
    assert [self_bleu_batch([g])[0] for g in groups[:20]] == pytest.approx(got[:20], abs=1e-12, nan_ok=True)


def test_self_bleu_batch_input_types_agree():
    rng = random.Random(2)
    groups = random_groups(rng, 30)
    expected = self_bleu_batch(groups)
    as_tensors = [[torch.tensor(s, dtype=torch.int64) for s in g] for g in groups]
    as_int32 = [[np.array(s, dtype=np.int32) for s in g] for g in groups]
    as_strings = [[[f"w{t}" for t in s] for s in g] for g in groups]
    # huge and negative ids (forces exact re-ranking of n-gram keys instead of plain packing)
    as_huge = [[[t * (1 << 40) - 7 for t in s] for s in g] for g in groups]
    for variant in (as_tensors, as_int32, as_strings, as_huge):
        assert self_bleu_batch(variant) == pytest.approx(expected, abs=1e-12)
    padded = [torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]])]  # a 2-D tensor is k samples of equal length
    assert self_bleu_batch(padded)[0] == pytest.approx(nltk_self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]), abs=1e-12)


def test_self_bleu_on_text():
    groups = [TEXTS[:3], TEXTS[3:6], TEXTS[6:]]
    got = self_bleu_batch(groups)
    for group, value in zip(groups, got):
        assert value == pytest.approx(nltk_self_bleu([tokenize_text(t) for t in group]), abs=1e-6)


def test_self_bleu_edge_cases():
    def one(group):
        return self_bleu_batch([group])[0]

    assert math.isnan(one([[1, 2, 3]]))  # k = 1: no references
    assert math.isnan(one([]))
    assert one([[1, 2, 3, 4, 5]] * 4) == pytest.approx(1.0, abs=1e-12)
    assert one([["a", "b", "c", "d"], ["a", "b", "c", "d"]]) == pytest.approx(1.0, abs=1e-12)
    assert one([[], []]) == 0.0
    assert one([[], [1, 2, 3]]) == 0.0  # the empty sample scores 0, the other matches nothing
    assert one([[3, 3], [3, 3]]) == pytest.approx(0.1**0.5, abs=1e-12)
    assert one([[1, 2], [3, 4]]) == 0.0
    with pytest.raises(ValueError, match=r"groups\[0\]\[1\].*1-D"):
        self_bleu_batch([[torch.zeros(3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)]])
    with pytest.raises(ValueError, match=r"groups\[0\] must be a sequence"):
        self_bleu_batch(["not a group"])


def test_tokenize_text():
    assert tokenize_text("It's 3.5 km.") == ["It", "'", "s", "3", ".", "5", "km", "."]
    assert tokenize_text("  ") == []


# ----------------------------------------------------------------------------------------------------------
# distinct-n and pass@k
# ----------------------------------------------------------------------------------------------------------


def test_distinct_n_hand_examples():
    def one(group, n):
        return distinct_n_batch([group], n)[0]

    assert one([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert one([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert one([[1, 2], [2, 3]], 2) == 1.0  # no n-gram across samples: (2, 2) is not counted
    assert one(["a a a a"], 1) == 0.25
    assert one([[1], []], 2) == 0.0
    assert one([], 1) == 0.0
    assert distinct_n_batch([], 1) == []
    with pytest.raises(ValueError, match="n must be >= 1"):
        one([[1]], 0)


def test_distinct_n_batch_matches_slow_reference():
    rng = random.Random(3)
    groups = random_groups(rng, 50, ks=(0, 1, 3))
    for n in (1, 2, 3, 4):
        assert distinct_n_batch(groups, n) == pytest.approx([distinct_n(g, n) for g in groups], abs=1e-12)


def brute_pass_at_k(n, c, k):
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: the product form stays accurate where binomials are huge
    exact = 1 - Fraction(math.comb(197, 100), math.comb(200, 100))
    assert pass_at_k(200, 3, 100) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="c .* must be in"):
        pass_at_k(3, 4, 1)


# ----------------------------------------------------------------------------------------------------------
# Entropy and KL
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_token_entropy_metric_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    mask = torch.rand(3, 7) > 0.4
    expected = torch.distributions.Categorical(logits=logits).entropy()[mask].mean()
    metric = TokenEntropy(chunk_size=4)
    metric.update(logits[:2], mask[:2])
    metric.update(logits[2:], mask[2:])
    assert metric.compute().item() == pytest.approx(expected.item(), abs=1e-5)

    from_values = TokenEntropy()
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    from_values.update_from_values(entropy, mask)
    assert from_values.compute().item() == pytest.approx(expected.item(), abs=1e-6)

    unmasked = TokenEntropy()
    unmasked.update(logits)
    assert unmasked.compute().item() == pytest.approx(entropy.mean().item(), abs=1e-5)
    assert math.isnan(TokenEntropy().compute().item())


def test_kl_divergence_matches_torch_distributions():
    torch.manual_seed(1)
    logits, base = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    per_token = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=base)
    )
    got = kl_divergence(logits, base, mask, chunk_size=3, reduction="none")
    assert torch.allclose(got, per_token * mask, atol=1e-6)
    assert kl_divergence(logits, base, mask).item() == pytest.approx(per_token[mask].mean().item(), abs=1e-6)
    # base given as log-probabilities gives the same numbers; KL(p || p) = 0
    assert kl_divergence(logits, torch.log_softmax(base, -1), mask).item() == pytest.approx(per_token[mask].mean().item(), abs=1e-6)
    assert kl_divergence(logits, logits).abs().max().item() < 1e-6
    # a token the model gives probability 0 contributes nothing, even where the base also gives it 0
    p = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1).clone()
    p[0, 0] = -math.inf
    q = p.clone()
    assert kl_divergence(p, q).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="mask must have shape"):
        kl_divergence(logits, base, mask[:, :3])

    metric = KLToBase(chunk_size=2)
    metric.update(logits[:1], base[:1], mask[:1])
    metric.update(logits[1:], base[1:], mask[1:])
    assert metric.compute().item() == pytest.approx(per_token[mask].mean().item(), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Metric classes and their synchronisation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_self_bleu_and_distinct_metrics():
    rng = random.Random(4)
    groups = random_groups(rng, 12, ks=(1, 2, 4))
    per_prompt = [nltk_self_bleu(g) for g in groups]
    valid = [v for v in per_prompt if not math.isnan(v)]
    metric = SelfBLEU()
    metric.update(groups[:5])
    metric.update(groups[5:])
    assert metric.compute().item() == pytest.approx(sum(valid) / len(valid), abs=1e-6)
    assert metric.count.item() == len(valid)

    distinct = DistinctN(n=2)
    distinct.update(groups)
    assert distinct.compute().item() == pytest.approx(sum(distinct_n(g, 2) for g in groups) / len(groups), abs=1e-12)

    only_singletons = SelfBLEU()
    only_singletons.update([[[1, 2, 3]]])
    assert math.isnan(only_singletons.compute().item())


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_pass_at_k_metric():
    metric = PassAtK(ks=(1, 4))
    metric.update([4, 4, 2], [1, 0, 2])
    metric.update(torch.tensor([8]), torch.tensor([3]))
    result = metric.compute()
    assert result["pass@1"].item() == pytest.approx((0.25 + 0.0 + 1.0 + 3 / 8) / 4)
    # the problem with 2 samples has no pass@4
    assert result["pass@4"].item() == pytest.approx((1.0 + 0.0 + pass_at_k(8, 3, 4)) / 3)
    assert math.isnan(PassAtK(ks=(16,)).compute()["pass@16"].item())
    with pytest.raises(ValueError, match="one entry per problem"):
        metric.update([4, 4], [1])


def _make_metrics():
    return {
        "entropy": TokenEntropy(),
        "kl": KLToBase(),
        "self_bleu": SelfBLEU(),
        "distinct": DistinctN(n=2),
        "pass": PassAtK(ks=(1, 2)),
    }


def _update_half(metrics, half: int):
    gen = torch.Generator().manual_seed(7)
    logits, base = torch.randn(4, 6, 9, generator=gen), torch.randn(4, 6, 9, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    groups = random_groups(random.Random(8), 10, ks=(1, 3, 4))
    rows, prompts = slice(2 * half, 2 * half + 2), slice(5 * half, 5 * half + 5)
    metrics["entropy"].update(logits[rows], mask[rows])
    metrics["kl"].update(logits[rows], base[rows], mask[rows])
    metrics["self_bleu"].update(groups[prompts])
    metrics["distinct"].update(groups[prompts])
    metrics["pass"].update([3, 5, 1, 2][2 * half : 2 * half + 2], [1, 0, 1, 2][2 * half : 2 * half + 2])


def _computed(metrics) -> dict[str, float]:
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            out.update({f"{name}/{k}": v.item() for k, v in value.items()})
        else:
            out[name] = value.item()
    return out


def test_merged_halves_equal_one_metric_on_all():
    whole = _make_metrics()
    _update_half(whole, 0)
    _update_half(whole, 1)
    first, second = _make_metrics(), _make_metrics()
    _update_half(first, 0)
    _update_half(second, 1)
    for name in first:
        first[name].merge_state(second[name])
    # torchmetrics' own sync reduces each state with its dist_reduce_fx; the states are sums
    for name in first:
        assert all(fx is not None and fx.__name__ in ("sum", "_sum", "dim_zero_sum") for fx in first[name]._reductions.values())
    assert _computed(first) == pytest.approx(_computed(whole), abs=1e-12, nan_ok=True)


def _sync_worker(rank: int, world_size: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    metrics = _make_metrics()
    _update_half(metrics, rank)
    torch.save(_computed(metrics), os.path.join(out_dir, f"rank{rank}.pt"))  # compute() syncs over the group
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_ddp_sync_over_gloo_equals_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    whole = _make_metrics()
    _update_half(whole, 0)
    _update_half(whole, 1)
    expected = _computed(whole)
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the children reuse this interpreter's imports (spawn would re-import torch: ~10 s on 2 cores)
        torch.multiprocessing.start_processes(_sync_worker, args=(2, port, out_dir), nprocs=2, join=True, start_method="fork")
        for rank in range(2):
            assert torch.load(os.path.join(out_dir, f"rank{rank}.pt")) == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_token_entropy_from_values_counts_as_an_update_and_invalidates_the_cache():
    import warnings

    from aesl_lightning.metrics import TokenEntropy

    metric = TokenEntropy()
    metric.update_from_values(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, True]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute called before update" warning
        assert metric.compute().item() == 2.0
    metric.update_from_values(torch.tensor([[5.0, 9.0]]), torch.tensor([[True, False]]))
    assert metric.compute().item() == 3.0  # (1 + 3 + 5) / 3, not the cached 2.0


def test_sum_count_metrics_update_after_a_reset_under_inference_mode():
    """A `trainer.validate()` resets states under `torch.inference_mode`; the next update may run outside it."""
    logits, base = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    for metric, args in ((TokenEntropy(), (logits,)), (KLToBase(), (logits, base)), (PassAtK(ks=(1, 2)), ([2, 4], [1, 0]))):
        with torch.inference_mode():
            metric.update(*args)
            metric.reset()
        assert metric.total.is_inference()
        metric.update(*args)
        metric.update(*args)
        fresh = type(metric)(**({"ks": (1, 2)} if isinstance(metric, PassAtK) else {}))
        fresh.update(*args)
        torch.testing.assert_close(metric.compute(), fresh.compute())
        assert (metric.count == 2 * fresh.count).all()
