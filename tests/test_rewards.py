"""Reward functions: TRL signature, boxed extraction, symbolic answer checking."""

import pytest

from aesl_lightning.rewards import answers_match, boxed_format, extract_boxed, math_accuracy


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{47}.", "47"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("no answer here", None),
        ("\\boxed{12", None),
    ],
)
def test_extract_boxed_takes_the_last_balanced_box(text, expected):
    assert extract_boxed(text) == expected


def test_math_accuracy_is_symbolic_and_follows_trl_signature():
    completions = ["12 + 35 = 47\nThe answer is \\boxed{47}", "\\boxed{0.5}", "\\boxed{50}", "I think 47"]
    rewards = math_accuracy(["p"] * 4, completions, answer=["47", "1/2", "47", "47"], extra_column=[1, 2, 3, 4])
    assert rewards == [1.0, 1.0, 0.0, 1.0]


def test_conversational_completions_and_missing_answers():
    completions = [[{"role": "assistant", "content": "\\boxed{3}"}], "\\boxed{3}"]
    assert math_accuracy(["a", "b"], completions, answer=["3", None]) == [1.0, None]
    with pytest.raises(ValueError, match="answers"):
        math_accuracy(["a"], ["\\boxed{1}"], answer=["1", "2"])


def test_answers_match_negative_and_thousands():
    assert answers_match("\\boxed{-5}", "-5")
    assert not answers_match("\\boxed{5}", "-5")
    assert answers_match("\\boxed{1,234}", "1234")


def test_boxed_format():
    rewards = boxed_format(["p"] * 3, ["a\n\\boxed{4}", "\\boxed{4} and more", "4"])
    assert rewards == [1.0, 0.0, 0.0]
