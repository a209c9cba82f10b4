"""The turning-point rule's format gate and noise margin, on scripted curves where the old rule (no gate,
min_delta 0) was wrong, through the pure `find_turning_point` and through the callback's rule."""

import math
import statistics

import pytest

from aesl_lightning.training.early_stopping import DiversityEarlyStopping
from aesl_lightning.maths.turning_point import TurningPointConfig, TurningPointRule, find_turning_point

STEPS = [0, 1, 2, 4, 8, 16, 32]
# A base model's free prose scores far above any template at step 0; the format (boxed rate) is learned by step 4,
# after which diversity rises to a peak at step 8 and then collapses.
PROSE_SCORES = [3.0, 1.0, 0.8, 1.2, 1.5, 1.3, 1.0]
BOXED_RATES = [0.0, 0.2, 0.5, 0.95, 0.95, 1.0, 1.0]


def test_without_the_gate_free_prose_at_step_0_is_called_the_turning_point():
    old = find_turning_point(STEPS, PROSE_SCORES, smoothing="none", patience=2)
    assert old.step == 0  # the format change, not over-fitting
    assert "boundary" in old.reason


def test_the_format_gate_moves_the_turning_point_to_the_peak_after_the_format_is_learned():
    new = find_turning_point(STEPS, PROSE_SCORES, format_rates=BOXED_RATES, format_level=0.9, smoothing="none",
                             patience=2)
    assert new.step == 8 and new.index == 4
    assert [h["status"] for h in new.history[:3]] == ["format"] * 3
    assert new.reason.startswith("turning point at step 8")


def test_a_format_never_learned_gives_no_turning_point_and_says_why():
    result = find_turning_point(STEPS, PROSE_SCORES, format_rates=[0.1] * 7, smoothing="none", patience=2)
    assert result.step is None and "never reached 0.9" in result.reason and "highest 0.1" in result.reason


def _validation(per_prompt):
    return statistics.mean(per_prompt), statistics.stdev(per_prompt) / math.sqrt(len(per_prompt))


def _blip_curve():
    """16 prompts per validation; at step 4 one prompt scores 5 instead of ~1 (a one-prompt blip)."""
    base = [1.0 + 0.05 * ((7 * p) % 5 - 2) for p in range(16)]
    validations = []
    for step in STEPS:
        values = list(base)
        if step == 4:
            values[3] = 5.0
        validations.append(_validation(values))
    return [m for m, _ in validations], [se for _, se in validations]


def test_without_a_margin_a_one_prompt_blip_is_called_the_turning_point():
    scores, _ = _blip_curve()
    old = find_turning_point(STEPS, scores, smoothing="none", patience=2)
    assert old.step == 4


def test_the_noise_margin_ignores_a_one_prompt_blip():
    scores, noise = _blip_curve()
    new = find_turning_point(STEPS, scores, noise, noise_k=2.0, smoothing="none", patience=2)
    assert new.step is None and "no turning point within 32 steps" in new.reason
    assert new.history[5]["status"] == "near" and new.history[5]["margin"] > scores[3] - scores[5]


def test_the_noise_margin_still_sees_a_real_decline():
    scores = [1.0, 1.2, 1.5, 1.3, 1.0, 0.8, 0.6]
    new = find_turning_point(STEPS, scores, [0.05] * 7, noise_k=2.0, smoothing="none", patience=2)
    assert new.step == 2
    assert new.history[4]["margin"] == pytest.approx(2.0 * math.hypot(0.05, 0.05))


def test_the_callback_reads_the_standard_errors_and_the_format_rate_by_name():
    callback = DiversityEarlyStopping(monitor=["val/distinct_answers", "val/pass_gap"], weights=[1.0, 2.0],
                                      smoothing="none", patience=1, noise_k=1.0, format_key="val/boxed_rate",
                                      format_level=0.5)
    rule = callback.rule
    assert rule.config.read() == ["val/distinct_answers", "val/pass_gap", "val/distinct_answers_se",
                                  "val/pass_gap_se", "val/boxed_rate"]
    first = rule.update({"val/distinct_answers": 3.0, "val/pass_gap": 0.5, "val/distinct_answers_se": 0.3,
                         "val/pass_gap_se": 0.2, "val/boxed_rate": 0.2}, step=0)
    assert first.status == "format"
    rule.update({"val/distinct_answers": 2.0, "val/pass_gap": 0.2, "val/distinct_answers_se": 0.3,
                 "val/pass_gap_se": 0.2, "val/boxed_rate": 0.8}, step=1)
    # sigma = sqrt((1 * 0.3)^2 + (2 * 0.2)^2) = 0.5 per validation
    assert rule.history[1]["noise"] == pytest.approx(0.5)
    fell = rule.update({"val/distinct_answers": 1.5, "val/pass_gap": 0.1, "val/distinct_answers_se": 0.3,
                        "val/pass_gap_se": 0.2, "val/boxed_rate": 0.9}, step=2)
    assert fell.status == "near"  # 2.4 -> 1.7: less than 1 * sqrt(0.5^2 + 0.5^2) = 0.71 below
    state = rule.state_dict()
    replayed = TurningPointRule(rule.config)
    replayed.load_state_dict(state)
    assert replayed.history == rule.history and replayed.format_open


@pytest.mark.parametrize("kwargs, match", [
    ({"format_level": 1.5}, "format_level"), ({"noise_k": -1}, "noise_k"), ({"noise_keys": ["a", "b"]}, "noise_keys"),
])
def test_bad_gate_and_margin_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TurningPointConfig(monitor="val/gen_entropy", **kwargs)


def test_mismatched_curves_are_named():
    with pytest.raises(ValueError, match="noise has 2 values, steps has 3"):
        find_turning_point([0, 1, 2], [1.0, 2.0, 3.0], noise=[0.1, 0.1])
