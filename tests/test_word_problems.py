"""The word-problem generator of the real-model track: determinism, disjoint splits, correct solutions, formats."""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

import pytest

from aesl_lightning.data.formats import load_prompt_examples, load_sft_examples, to_prompt_example, to_sft_example
from aesl_lightning.data.word_problems import (
    EASY,
    SPLITS,
    TEMPLATES,
    WordProblemConfig,
    generate_split,
    make_splits,
    split_of,
    write_splits,
)
from aesl_lightning.scoring.rewards import boxed_format, extract_boxed, math_accuracy

SIZES = {"coldstart": 48, "val": 64, "rl": 400, "test": 200, "test_hard": 120}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_LINE = re.compile(r"^[^:]+: (\d+) ([-+*/]) (\d+) = (\d+)$")


@pytest.fixture(scope="module")
def splits():
    return make_splits(SIZES, seed=3)


def evaluate(expression: str) -> Fraction:
    """Independent reference: Python's parser over exact fractions, +, -, *, / on integer literals only."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def test_same_seed_same_splits_other_seed_other_problems():
    assert make_splits(SIZES, seed=3) == make_splits(SIZES, seed=3)
    other = make_splits(SIZES, seed=4)
    assert {r["key"] for r in other["test"]} != {r["key"] for r in make_splits(SIZES, seed=3)["test"]}


def test_a_split_depends_only_on_its_own_seed_and_size():
    small = generate_split("test", 30, EASY, seed=3)
    large = generate_split("test", 90, EASY, seed=3)
    assert large[:30] == small  # growing a split appends; never changes the problems already in it
    grown = make_splits({**SIZES, "rl": 800}, seed=3)
    assert grown["test"] == make_splits(SIZES, seed=3)["test"]


def test_splits_are_disjoint_by_key_and_prompt_and_each_problem_is_in_its_bucket(splits):
    for name, records in splits.items():
        assert len(records) == SIZES[name]
        assert all(split_of(r["key"]) == name for r in records)
        assert len({r["key"] for r in records}) == len(records)
    keys = [r["key"] for records in splits.values() for r in records]
    prompts = [r["prompt"] for records in splits.values() for r in records]
    assert len(set(keys)) == len(keys)
    assert len(set(prompts)) == len(prompts)


def test_split_of_is_a_partition_and_roughly_balanced():
    counts = {name: 0 for name in SPLITS}
    for i in range(5000):
        counts[split_of(f"k{i}")] += 1
    assert sum(counts.values()) == 5000
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_every_answer_is_correct_by_recomputation(splits):
    for name, records in splits.items():
        for r in records:
            value = evaluate(r["expression"])
            assert value.denominator == 1 and value >= 1 and str(value.numerator) == r["answer"], r
            # every number of the formula is in the prompt (the problem states what the solution uses)
            stated = set(re.findall(r"\d+", r["prompt"]))
            assert set(re.findall(r"\d+", r["expression"])) <= stated, r


def test_every_solution_line_is_right_chains_and_ends_in_the_boxed_answer(splits):
    for name in ("coldstart", "val"):
        for r in splits[name]:
            *steps, last = r["completion"].split("\n")
            assert last == f"The answer is \\boxed{{{r['answer']}}}."
            assert len(steps) == r["num_ops"]
            known = {int(x) for x in re.findall(r"\d+", r["prompt"])}
            for line in steps:
                match = _LINE.match(line)
                assert match, line
                a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
                assert a in known and b in known, (line, known)  # operands are stated numbers or earlier results
                assert Fraction(result) == _OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult, "/": ast.Div}[op]](Fraction(a), Fraction(b))
                known.add(result)
            assert int(extract_boxed(r["completion"])) == result == int(r["answer"])
    cold = splits["coldstart"]
    assert math_accuracy([r["prompt"] for r in cold], [r["completion"] for r in cold], answer=[r["answer"] for r in cold]) == [1.0] * len(cold)
    assert boxed_format([r["prompt"] for r in cold], [r["completion"] for r in cold]) == [1.0] * len(cold)


def test_records_are_the_toolkits_formats(splits, tmp_path):
    files = write_splits(splits, tmp_path)
    for name in ("coldstart", "val"):
        assert all(to_sft_example(r, f"{name}[{i}]").completion == r["completion"] for i, r in enumerate(splits[name]))
        loaded = load_sft_examples(str(files[name]))
        assert [e.answer for e in loaded] == [r["answer"] for r in splits[name]]
    for name in ("rl", "test", "test_hard"):
        assert all("completion" not in r for r in splits[name])  # RL / evaluation: prompt and answer only
        assert all(to_prompt_example(r, name).answer == r["answer"] for r in splits[name])
        loaded = load_prompt_examples(str(files[name]))
        assert [e.prompt for e in loaded] == [r["prompt"] for r in splits[name]]


def test_difficulty_knobs(splits):
    assert {r["num_ops"] for r in splits["test"]} == {1, 2}
    assert {r["num_ops"] for r in splits["test_hard"]} == {2, 3}
    easy_answers = sorted(int(r["answer"]) for r in splits["test"])
    hard_answers = sorted(int(r["answer"]) for r in splits["test_hard"])
    assert hard_answers[len(hard_answers) // 2] > 1.5 * easy_answers[len(easy_answers) // 2]
    # every template of the allowed step counts occurs in a large split
    assert {r["template"] for r in splits["rl"]} == {t.name for t in TEMPLATES if t.num_ops <= 2}
    assert {r["template"] for r in splits["test_hard"]} == {t.name for t in TEMPLATES if 2 <= t.num_ops <= 3}
    assert {r["template"] for r in generate_split("rl", 300, WordProblemConfig(min_ops=3, max_ops=4), seed=0)} == {
        t.name for t in TEMPLATES if t.num_ops >= 3}


def test_instruction_is_appended():
    config = WordProblemConfig(instruction="Put the final answer in \\boxed{}.")
    records = generate_split("test", 5, config, seed=0)
    assert all(r["prompt"].endswith(" Put the final answer in \\boxed{}.") for r in records)
    plain = generate_split("test", 5, EASY, seed=0)
    assert [r["prompt"] for r in plain] == [r["prompt"].removesuffix(" Put the final answer in \\boxed{}.") for r in records]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no template has 7..9 steps"):
        generate_split("test", 3, WordProblemConfig(min_ops=7, max_ops=9), seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        generate_split("train", 3, EASY, seed=0)
    with pytest.raises(ValueError, match="unknown templates"):
        generate_split("test", 3, WordProblemConfig(only=("nope",)), seed=0)
    # "together" has 18 x 14 = 252 problems, about a fifth of them in each bucket: 200 cannot be found
    together = WordProblemConfig(only=("together",))
    assert len(generate_split("test", 30, together, seed=0)) == 30
    with pytest.raises(ValueError, match="test: found only"):
        generate_split("test", 200, together, seed=0)
