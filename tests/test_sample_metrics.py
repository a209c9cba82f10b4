"""SampleMetrics on hand-built generations: grouping per prompt, EOS stripping, pass@k and self-BLEU."""

import pytest
import torch

from aesl_lightning.infra.generation import Generation
from aesl_lightning.metrics import pass_at_k
from aesl_lightning.modules.sample_metrics import SampleMetrics, completion_token_groups

EOS = 2


def _generation(rows, entropy=None):
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    truncated = torch.tensor([row[-1] != EOS for row in rows])
    prompt = torch.ones(len(rows), 1, dtype=torch.long)
    return Generation(prompt, prompt, ids, mask, truncated, [""] * len(rows), entropy)


def test_groups_strip_the_closing_eos_and_follow_prompt_order():
    gen = _generation([[5, 6, EOS], [5, 7], [8, EOS], [9, 9, 9]])
    assert completion_token_groups(gen, 2, [EOS]) == [[[5, 6], [5, 7]], [[8], [9, 9, 9]]]


def test_identical_samples_have_self_bleu_one_and_pass_at_k_is_unbiased():
    same = [10, 11, 12, 13, 14, EOS]
    gen = _generation([same, same, same, [20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, EOS], [40, 41, 42, 43, EOS]],
                      entropy=torch.full((6, 7), 0.5))
    metrics = SampleMetrics(ks=(1, 3))
    metrics.update(gen, num_samples=3, eos_token_ids=[EOS], scores=[1.0, 0.0, 0.0, 1.0, 1.0, None])
    values = metrics.compute(prefix="val/")
    # prompt 1: three identical samples -> 1.0; prompt 2: disjoint samples -> 0.0
    assert values["val/self_bleu"].item() == pytest.approx(0.5)
    assert values["val/gen_entropy"].item() == pytest.approx(0.5)
    assert values["val/gen_truncated"].item() == pytest.approx(1 / 6)
    assert values["val/gen_length"].item() == pytest.approx((6 * 3 + 7 + 5 + 5) / 6)
    assert values["val/sample_accuracy"].item() == pytest.approx(3 / 5)
    # pass@1 over problems: (1/3 + 2/2) / 2; pass@3 only defined for the problem with 3 scored samples
    assert values["val/pass@1"].item() == pytest.approx((pass_at_k(3, 1, 1) + pass_at_k(2, 2, 1)) / 2)
    assert values["val/pass@3"].item() == pytest.approx(1.0)
    metrics.reset()
    assert metrics.compute() == {}


def test_sample_metrics_is_a_metric_collection_that_merges_batches_and_moves_as_one():
    from torchmetrics import MetricCollection

    metrics = SampleMetrics(ks=(1, 2))
    assert isinstance(metrics, MetricCollection)
    assert set(metrics.keys()) >= {"gen_entropy", "self_bleu", "distinct_2", "distinct_answers", "pass_at"}
    gen = _generation([[5, 6, EOS], [5, 7, EOS], [8, EOS], [9, EOS]])
    gen.texts = ["\\boxed{1}", "\\boxed{ 1}", "\\boxed{2}", "no answer"]
    # two batches of one prompt each == one batch of both prompts
    halves = SampleMetrics(ks=(1, 2))
    halves.update(Generation(gen.prompt_ids[:2], gen.prompt_mask[:2], gen.completion_ids[:2], gen.completion_mask[:2],
                             gen.truncated[:2], gen.texts[:2]), 2, [EOS], scores=[1.0, 0.0])
    halves.update(Generation(gen.prompt_ids[2:], gen.prompt_mask[2:], gen.completion_ids[2:], gen.completion_mask[2:],
                             gen.truncated[2:], gen.texts[2:]), 2, [EOS], scores=[0.0, 0.0])
    metrics.update(gen, 2, [EOS], scores=[1.0, 0.0, 0.0, 0.0])
    whole, merged = metrics.compute(), halves.compute()
    assert whole.keys() == merged.keys() and "pass@2" in whole
    for key in whole:
        assert merged[key].item() == pytest.approx(whole[key].item()), key
    # distinct answers: prompt 1 gives "1" twice (whitespace ignored), prompt 2 gives "2" and nothing
    assert whole["distinct_answers"].item() == pytest.approx(1.0)
    metrics.reset()
    assert metrics.compute() == {}
