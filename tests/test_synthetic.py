"""The synthetic arithmetic task: determinism, correct answers, knobs, disjoint splits, files and CLI."""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aesl_lightning.data.synthetic import ArithmeticConfig, disjoint_splits, generate_arithmetic, main, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_STEP = re.compile(r"^(-?\d+) ([+*-]) (\d+) = (-?\d+)$")


def evaluate(expression: str) -> int:
    """Independent reference: Python's own parser and precedence, restricted to +, -, * on integers."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def running_totals(record: dict) -> list[int]:
    totals = [record["operands"][0]]
    for op, b in zip(record["operations"], record["operands"][1:]):
        totals.append({"add": operator.add, "sub": operator.sub, "mul": operator.mul}[op](totals[-1], b))
    return totals


ALL_STYLES = ArithmeticConfig(num_examples=300, seed=1, max_steps=4, solution_styles=("steps", "equation", "verbose"), allow_negative=True)


def test_same_seed_same_problems_and_different_seed_different_problems():
    config = ArithmeticConfig(num_examples=50, seed=7)
    assert generate_arithmetic(config) == generate_arithmetic(config)
    other = generate_arithmetic(ArithmeticConfig(num_examples=50, seed=8))
    assert [r["prompt"] for r in other] != [r["prompt"] for r in generate_arithmetic(config)]


def test_global_rng_is_untouched():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_arithmetic(ArithmeticConfig(num_examples=20))
    assert random.random() == expected


@pytest.mark.parametrize("config", [ArithmeticConfig(num_examples=300), ALL_STYLES], ids=["default", "all-styles-negative"])
def test_every_answer_is_correct_and_boxed(config):
    for record in generate_arithmetic(config):
        answer = record["answer"]
        assert evaluate(record["expression"]) == int(answer), record
        assert running_totals(record)[-1] == int(answer), record
        assert record["completion"].endswith(f"\\boxed{{{answer}}}"), record
        assert record["num_steps"] == len(record["operations"]) == len(record["operands"]) - 1


def test_step_lines_are_correct_arithmetic():
    records = generate_arithmetic(ArithmeticConfig(num_examples=200, max_steps=4))
    for record in records:
        lines = record["completion"].split("\n")
        assert len(lines) == record["num_steps"] + 1
        for line, a, b, result in zip(lines, running_totals(record), record["operands"][1:], running_totals(record)[1:]):
            match = _STEP.match(line)
            assert match, line
            left, symbol, right, value = match.groups()
            assert (int(left), int(right), int(value)) == (a, b, result)
            assert int(value) == {"+": operator.add, "-": operator.sub, "*": operator.mul}[symbol](int(left), int(right))
        assert lines[-1] == f"The answer is \\boxed{{{record['answer']}}}"


def test_solution_styles_differ_and_equation_is_one_line():
    records = generate_arithmetic(ALL_STYLES)
    styles = {r["solution_style"] for r in records}
    assert styles == {"steps", "equation", "verbose"}
    for record in records:
        lines = record["completion"].split("\n")
        if record["solution_style"] == "equation":
            assert len(lines) == 1 and lines[0].startswith(record["expression"] + " = ")
        if record["solution_style"] == "verbose":
            assert lines[0] == f"Start with {record['operands'][0]}." and len(lines) == record["num_steps"] + 2


def test_digit_step_and_operation_knobs_are_respected():
    config = ArithmeticConfig(num_examples=200, min_digits=2, max_digits=3, min_steps=2, max_steps=3, operations=("add", "mul"), mul_max_digits=1)
    for record in generate_arithmetic(config):
        assert 2 <= record["num_steps"] <= 3
        assert set(record["operations"]) <= {"add", "mul"}
        assert 10 <= record["operands"][0] <= 999
        for op, b in zip(record["operations"], record["operands"][1:]):
            assert (2 <= b <= 9) if op == "mul" else (10 <= b <= 999), record


def test_no_negative_values_unless_allowed():
    config = ArithmeticConfig(num_examples=300, operations=("sub",), min_steps=2, max_steps=3)
    for record in generate_arithmetic(config):
        assert min(running_totals(record)) >= 0, record
    negative = generate_arithmetic(ArithmeticConfig(num_examples=300, operations=("sub",), min_steps=2, allow_negative=True))
    assert any(int(r["answer"]) < 0 for r in negative)


def test_every_phrasing_is_used_and_mentions_all_operands():
    records = generate_arithmetic(ArithmeticConfig(num_examples=200))
    assert {r["phrasing"] for r in records} == {"word", "expression", "instructions"}
    word = [r for r in records if r["phrasing"] == "word"]
    assert len({r["prompt"].split()[1] for r in word}) > 3  # several story templates / names
    for record in records:
        numbers = [int(n) for n in re.findall(r"\d+", record["prompt"])]
        assert numbers == record["operands"], record["prompt"]


def test_prompts_are_unique_and_splits_are_disjoint():
    config = ArithmeticConfig(num_examples=400, max_digits=1, max_steps=2)
    records = generate_arithmetic(config)
    assert len({r["prompt"] for r in records}) == len(records) == 400
    splits = disjoint_splits(config, {"train": 400, "val": 50, "test": 50})
    assert splits["train"] == records  # the first split is the plain generated set
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not {r["expression"] for r in splits[a]} & {r["expression"] for r in splits[b]}
        assert not {r["prompt"] for r in splits[a]} & {r["prompt"] for r in splits[b]}
    excluded = generate_arithmetic(ArithmeticConfig(num_examples=50, seed=5, max_digits=1, max_steps=2), exclude=records)
    assert not {r["expression"] for r in excluded} & {r["expression"] for r in records}


def test_too_narrow_knobs_raise_instead_of_looping():
    # 9 * 9 one-digit additions under 5 expression templates: at most 405 distinct prompts.
    config = ArithmeticConfig(num_examples=500, max_digits=1, max_steps=1, operations=("add",), phrasings=("expression",))
    with pytest.raises(ValueError, match="distinct problems"):
        generate_arithmetic(config)


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_digits=3, max_digits=2), dict(min_steps=0), dict(operations=("div",)), dict(solution_styles=()), dict(phrasings=("poem",))],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError, match="ArithmeticConfig"):
        ArithmeticConfig(**kwargs)


def test_write_jsonl_roundtrips_and_is_atomic(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    records = generate_arithmetic(ArithmeticConfig(num_examples=10))
    write_jsonl(records, path)
    assert read_jsonl(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]

    def failing():
        yield records[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert read_jsonl(path) == records  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]  # and no temporary file is left


def test_cli_writes_the_configured_set(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    main(["--num-examples", "30", "--seed", "3", "--out", str(out), "--operations", "add", "sub", "--max-steps", "2", "--solution-styles", "equation"])
    records = read_jsonl(out)
    assert records == generate_arithmetic(
        ArithmeticConfig(num_examples=30, seed=3, operations=("add", "sub"), max_steps=2, solution_styles=("equation",))
    )
    val = tmp_path / "val.jsonl"
    main(["--num-examples", "20", "--seed", "3", "--out", str(val), "--operations", "add", "sub", "--max-steps", "2", "--exclude", str(out)])
    assert not {r["expression"] for r in read_jsonl(val)} & {r["expression"] for r in records}
    with pytest.raises(SystemExit):
        main(["--num-examples", "5", "--min-digits", "3", "--max-digits", "1", "--out", str(tmp_path / "bad.jsonl")])
    assert "min_digits" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    out = tmp_path / "d.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "aesl_lightning.data.synthetic", "--num-examples", "4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert len(out.read_text().splitlines()) == 4
    assert json.loads(out.read_text().splitlines()[0])["completion"].endswith("}")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask_and_leave_no_temporary_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_jsonl([{"a": 1}], tmp_path / "out.jsonl")
        write_jsonl([{"a": 2}], tmp_path / "out.jsonl")  # replacing keeps the mode too
    finally:
        os.umask(previous)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
