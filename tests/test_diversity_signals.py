"""The signals the turning point can use without rewarding longer text, and their standard errors over prompts."""

import math
import statistics

import pytest
import torch

from aesl_lightning.metrics.spread import MeanSE
from aesl_lightning.modules.sample_metrics import SampleMetrics
from tests.test_sample_metrics import EOS, _generation


def test_mean_se_matches_the_textbook_standard_error_and_merges_batches():
    values = [0.1, 0.5, 0.2, 0.9, 0.4, float("nan")]
    metric = MeanSE("x")
    metric.update(values[:2])
    metric.update(torch.tensor(values[2:]))
    out = metric.compute()
    finite = values[:5]
    assert out["x"].item() == pytest.approx(statistics.mean(finite))
    assert out["x_se"].item() == pytest.approx(statistics.stdev(finite) / math.sqrt(5))
    only = MeanSE("y", report_mean=False)
    only.update([1.0])
    assert set(only.compute()) == {"y_se"} and math.isnan(only.compute()["y_se"].item())  # one prompt: no spread


def test_boxed_rate_pass_gap_and_standard_errors_per_prompt():
    rows = [[5, 6, EOS], [5, 7, EOS], [8, EOS], [9, EOS], [3, EOS], [4, EOS]]
    entropy = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [2.0, 0.0, 0.0],
                            [2.0, 0.0, 0.0]])
    gen = _generation(rows, entropy=entropy)
    gen.texts = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "prose", "prose", "prose"]
    metrics = SampleMetrics(ks=(1, 2))
    metrics.update(gen, 2, [EOS], scores=[1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    values = metrics.compute(prefix="val/")
    assert values["val/boxed_rate"].item() == pytest.approx(3 / 6)
    # pass@2 - pass@1 per prompt: 1 - 1/2, 1 - 1, 0 - 0
    gaps = [0.5, 0.0, 0.0]
    assert values["val/pass_gap"].item() == pytest.approx(statistics.mean(gaps))
    assert values["val/pass_gap_se"].item() == pytest.approx(statistics.stdev(gaps) / math.sqrt(3))
    # distinct answers per prompt: 2, 1, 0
    assert values["val/distinct_answers_se"].item() == pytest.approx(statistics.stdev([2, 1, 0]) / math.sqrt(3))
    # entropy over the completion tokens (EOS included): token-pooled (4 + 6 + 4) / 14, spread from the per-prompt
    # means 4/6, 6/4, 4/4
    assert values["val/gen_entropy"].item() == pytest.approx(14 / 14)
    assert values["val/gen_entropy_se"].item() == pytest.approx(statistics.stdev([4 / 6, 6 / 4, 4 / 4]) / math.sqrt(3))
    assert "val/self_bleu_se" in values and "val/distinct_2_se" in values
