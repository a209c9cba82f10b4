"""The strategy world: the labeller on hand-written completions, arithmetic of every strategy, determinism."""

import random

import pytest

from aesl_lightning.data.strategy_world import (OTHER, STRATEGIES, Problem, WorldConfig, answer_format, coldstart, column_body, fixed_splits,
                                                is_correct, label_strategy, round_body, solution, strategy_counts, target_answer)

HAND_WRITTEN = [
    # (completion, strategy, format)
    ("247+538 = 785\nAnswer: 785", "direct", "native"),
    ("Solution:\n247+538 = 785\nThe answer is \\boxed{785}.", "direct", "target"),
    ("538 = 540-2. 247+540 = 787. 787-2 = 785\nAnswer: 785", "round", "native"),
    ("Solution:\n533 = 530+3. 247+530 = 777. 777+3 = 780\nThe answer is \\boxed{780}.", "round", "target"),
    ("7+8+0 = 15 carry 1. 4+3+1 = 8 carry 0. 2+5+0 = 7 carry 0. so 785\nAnswer: 785", "column", "native"),
    ("Solution:\n7+8+0 = 15 carry 1. 4+3+1 = 8 carry 0. 2+5+0 = 7 carry 0. so 785\nThe answer is \\boxed{785}.", "column", "target"),
    # wrong arithmetic keeps its strategy (the form decides)
    ("247+538 = 775\nAnswer: 775", "direct", "native"),
    ("Solution:\n7+8+0 = 14 carry 1. 4+3+1 = 8 carry 0. 2+5+0 = 7 carry 0. so 784\nThe answer is \\boxed{784}.", "column", "target"),
    # other: prose, mixed forms, truncated lines, empty
    ("The sum is 785.\nAnswer: 785", OTHER, "native"),
    ("538 = 540-2. 247+538 = 785\nAnswer: 785", OTHER, "native"),
    ("7+8+0 = 15 carry 1. 4+3+1 = 8 carry", OTHER, OTHER),
    ("Solution:\n247 + 538 = 785\nThe answer is \\boxed{785}.", OTHER, "target"),
    ("", OTHER, OTHER),
    ("Solution:\n247+538 = 785\nThe answer is 785.", "direct", OTHER),
    ("247+538 = 785\nAnswer: 785\nAnswer: 785", "direct", OTHER),
]


@pytest.mark.parametrize("completion,strategy,fmt", HAND_WRITTEN)
def test_labeller_on_hand_written_completions(completion, strategy, fmt):
    assert label_strategy(completion) == strategy
    assert answer_format(completion) == fmt


def test_every_generated_solution_is_labelled_with_its_strategy_and_is_right():
    rng = random.Random(0)
    for _ in range(2000):
        p = Problem(rng.randint(100, 999), rng.randint(100, 999))
        for s in STRATEGIES:
            for fmt in ("native", "target"):
                text = solution(p, s, fmt)
                assert label_strategy(text) == s, text
                assert answer_format(text) == fmt, text
            assert is_correct(solution(p, s, "target"), p.answer)
            assert not is_correct(solution(p, s, "native"), p.answer)  # the reward needs the target format


def test_strategy_bodies_compute_what_they_say():
    rng = random.Random(1)
    for _ in range(2000):
        p = Problem(rng.randint(100, 999), rng.randint(100, 999))
        first, second, third = round_body(p).split(". ")
        b, rounded = first.split(" = ")
        assert int(b) == p.b and abs(eval_simple(rounded) - p.b) == 0 and int(rounded[:-2]) % 10 == 0
        assert eval_simple(second.split(" = ")[0]) == int(second.split(" = ")[1])
        assert eval_simple(third.split(" = ")[0]) == int(third.split(" = ")[1]) == p.answer
        digits = [int(part.split(" = ")[1].split(" ")[0]) % 10 for part in column_body(p).split(". ")[:3]]
        assert int(column_body(p).rsplit("so ", 1)[1]) == p.answer
        assert digits == [int(d) for d in str(p.answer)[::-1][:3]]


def eval_simple(expr: str) -> int:
    """a+b or a-b of non-negative integers (never eval)."""
    for op in "+-":
        if op in expr:
            x, y = expr.split(op)
            return int(x) + int(y) if op == "+" else int(x) - int(y)
    return int(expr)


def test_target_answer_requires_the_whole_target_format():
    assert target_answer("Solution:\n247+538 = 785\nThe answer is \\boxed{785}.") == 785
    assert target_answer("Solution:\n247+538 = 785\nThe answer is \\boxed{785}. extra") is None
    assert target_answer("247+538 = 785\nThe answer is \\boxed{785}.") is None
    assert target_answer("Solution:\n247+538 = 785\nThe answer is \\boxed{78 5}.") is None


def test_generator_is_deterministic_per_seed_and_splits_are_disjoint():
    config = WorldConfig(pretrain_size=300, val_size=16, rl_size=32, test_size=32, coldstart_size=12)
    a, b = fixed_splits(config), fixed_splits(config)
    assert a == b
    other = fixed_splits(WorldConfig(pretrain_size=300, val_size=16, rl_size=32, test_size=32, data_seed=7))
    assert a["val"] != other["val"]
    keys = {name: {_parse(r["prompt"]) for r in a[name]} for name in ("val", "rl", "test", "pretrain")}
    for x, y in (("val", "rl"), ("val", "test"), ("rl", "test"), ("pretrain", "test"), ("pretrain", "val"), ("pretrain", "rl")):
        assert not keys[x] & keys[y], (x, y)
    assert {r["strategy"] for r in a["pretrain"]} == set(STRATEGIES)
    assert all(answer_format(r["completion"]) == "native" for r in a["pretrain"])
    c0, c0b, c1 = coldstart(config, 0, ["round"]), coldstart(config, 0, ["round"]), coldstart(config, 1, ["round"])
    assert c0 == c0b and c0 != c1
    # the same seed draws the same problems whatever the strategies (arms and controls are paired by problem)
    assert [r["prompt"] for r in coldstart(config, 0, ["column"])] == [r["prompt"] for r in c0]
    assert not {_parse(r["prompt"]) for r in c0 + c1} & set().union(*keys.values())
    assert all(label_strategy(r["completion"]) == "round" and answer_format(r["completion"]) == "target" for r in c0)
    assert strategy_counts(r["completion"] for r in coldstart(config, 2, list(STRATEGIES))) == {"direct": 4, "round": 4, "column": 4, OTHER: 0}


def _parse(prompt: str) -> tuple[int, int]:
    numbers = [int("".join(ch for ch in tok if ch.isdigit())) for tok in prompt.split() if any(ch.isdigit() for ch in tok)]
    return numbers[0], numbers[1]


def test_config_rejects_bad_mixtures():
    with pytest.raises(ValueError, match="pretrain_mix"):
        WorldConfig(pretrain_mix=(1.0, 0.0))
    with pytest.raises(ValueError, match="cold-start strategy"):
        coldstart(WorldConfig(pretrain_size=10), 0, ["guess"])


def test_target_share_writes_that_share_of_the_corpus_in_the_target_format_and_leaves_the_rest():
    plain = fixed_splits(WorldConfig(pretrain_size=4000, val_size=16, rl_size=16, test_size=16))
    mixed = fixed_splits(WorldConfig(pretrain_size=4000, val_size=16, rl_size=16, test_size=16, target_share=0.05))
    assert all(plain[k] == mixed[k] for k in ("val", "rl", "test"))
    target = [r for r in mixed["pretrain"] if answer_format(r["completion"]) == "target"]
    assert 0.035 < len(target) / 4000 < 0.065
    assert {label_strategy(r["completion"]) for r in target} == set(STRATEGIES)
    native = [(a, b) for a, b in zip(plain["pretrain"], mixed["pretrain"]) if answer_format(b["completion"]) == "native"]
    assert all(a == b for a, b in native)  # the native records are the very same
    with pytest.raises(ValueError, match="target_share"):
        WorldConfig(target_share=1.5)
