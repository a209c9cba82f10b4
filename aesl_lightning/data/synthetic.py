"""A verifiable synthetic task: arithmetic word problems with short step-by-step solutions.

Each problem is a left-to-right chain `((a op1 b) op2 c) ...` of additions, subtractions and
multiplications of positive integers, phrased as a story ("Ava has 12 apples. Then Ava buys 35 more
apples. ..."), as an expression ("What is (12 + 35) * 3?") or as instructions ("Start with 12. Add 35,
then multiply by 3."). The ground truth is exact, so the task serves SFT (prompt + solution), RL
(prompt + answer, rewarded by a verifier) and evaluation alike.

A record is a JSON-serialisable dict:

    {"prompt": str, "completion": str, "answer": str,          # the answer is an integer, as a string
     "expression": str, "operands": list[int], "operations": list[str], "num_steps": int,
     "phrasing": str, "solution_style": str}

`completion` always ends with `\\boxed{<answer>}`. Generation is deterministic in `ArithmeticConfig.seed`
(a private `random.Random`, never the global RNG) and no prompt occurs twice in one set.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from aesl_lightning.data.jsonl import read_jsonl, write_jsonl

Operation = Literal["add", "sub", "mul"]
Phrasing = Literal["word", "expression", "instructions"]
SolutionStyle = Literal["steps", "equation", "verbose"]

OPERATIONS: tuple[str, ...] = ("add", "sub", "mul")
PHRASINGS: tuple[str, ...] = ("word", "expression", "instructions")
SOLUTION_STYLES: tuple[str, ...] = ("steps", "equation", "verbose")

_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty and variety knobs of the synthetic arithmetic task.

    Args:
        num_examples: Number of problems to generate.
        seed: Seed of the generator; the same config always gives the same problems.
        min_digits: Fewest digits of an operand.
        max_digits: Most digits of an operand.
        mul_max_digits: Most digits of a multiplier (None: `max_digits`); keeps chains of products small.
        min_steps: Fewest operations per problem (1 = a single addition, subtraction or multiplication).
        max_steps: Most operations per problem (chains of several operations are multi-step problems).
        operations: Operations to draw from: "add", "sub", "mul".
        phrasings: Prompt styles to draw from: "word" (story), "expression", "instructions".
        solution_styles: Completion styles to draw from: "steps" (one line per operation), "equation" (one
            line), "verbose" (one sentence per operation).
        allow_negative: Whether intermediate results and answers may be negative.
    """

    num_examples: int = 1000
    seed: int = 0
    min_digits: int = 1
    max_digits: int = 2
    mul_max_digits: int | None = None
    min_steps: int = 1
    max_steps: int = 3
    operations: tuple[Operation, ...] = ("add", "sub", "mul")
    phrasings: tuple[Phrasing, ...] = ("word", "expression", "instructions")
    solution_styles: tuple[SolutionStyle, ...] = ("steps",)
    allow_negative: bool = False

    def __post_init__(self) -> None:
        # jsonargparse and JSON configs may hand lists; tuples keep the config hashable and frozen.
        for name in ("operations", "phrasings", "solution_styles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.num_examples >= 0, f"num_examples must be >= 0, got {self.num_examples}"),
            (1 <= self.min_digits <= self.max_digits, f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"),
            (self.mul_max_digits is None or self.mul_max_digits >= 1, f"mul_max_digits must be >= 1, got {self.mul_max_digits}"),
            (1 <= self.min_steps <= self.max_steps, f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ArithmeticConfig: {message}")
        for name, allowed in (("operations", OPERATIONS), ("phrasings", PHRASINGS), ("solution_styles", SOLUTION_STYLES)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"ArithmeticConfig: {name} must be a non-empty subset of {allowed}, got {values}")


# ----------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class _Problem:
    operands: tuple[int, ...]  # a, b, c, ...: operands[i + 1] is the right operand of operations[i]
    operations: tuple[str, ...]

    def values(self) -> list[int]:
        """Running totals: values()[i] is the result after i operations (values()[0] = operands[0])."""
        totals = [self.operands[0]]
        for op, b in zip(self.operations, self.operands[1:]):
            a = totals[-1]
            totals.append(a + b if op == "add" else a - b if op == "sub" else a * b)
        return totals

    def expression(self) -> str:
        """The chain with the fewest parentheses that keep left-to-right order under usual precedence."""
        text, top_is_sum = str(self.operands[0]), False
        for op, b in zip(self.operations, self.operands[1:]):
            if op == "mul" and top_is_sum:
                text = f"({text})"
            text = f"{text} {_SYMBOL[op]} {b}"
            top_is_sum = op != "mul"
        return text


def _digit_range(digits: int, least: int) -> tuple[int, int]:
    return max(10 ** (digits - 1), least), 10**digits - 1


def _operand(rng: random.Random, min_digits: int, max_digits: int, least: int, most: int | None) -> int | None:
    """A number of min..max digits in [least, most], digit count drawn first so short numbers stay common."""
    choices = [d for d in range(min_digits, max_digits + 1) if most is None or _digit_range(d, least)[0] <= most]
    if not choices:
        return None
    lo, hi = _digit_range(rng.choice(choices), least)
    return rng.randint(lo, hi if most is None else min(hi, most))


def _draw_problem(rng: random.Random, config: ArithmeticConfig) -> _Problem | None:
    """One random chain, or None when its subtractions cannot stay non-negative (the caller redraws)."""
    num_steps = rng.randint(config.min_steps, config.max_steps)
    operations = tuple(rng.choice(config.operations) for _ in range(num_steps))
    current = _operand(rng, config.min_digits, config.max_digits, 1, None)
    operands = [current]
    mul_max = config.mul_max_digits or config.max_digits
    for op in operations:
        if op == "mul":
            # A multiplier of 1 is a non-step; the smallest multiplier is 2.
            b = _operand(rng, min(config.min_digits, mul_max), mul_max, 2, None)
        elif op == "sub" and not config.allow_negative:
            b = _operand(rng, config.min_digits, config.max_digits, 1, current)
        else:
            b = _operand(rng, config.min_digits, config.max_digits, 1, None)
        if b is None:
            return None
        operands.append(b)
        current = _Problem(tuple(operands), operations[: len(operands) - 1]).values()[-1]
    return _Problem(tuple(operands), operations)


# ----------------------------------------------------------------------------------------------------
# Phrasing


@dataclass(frozen=True)
class _Story:
    start: tuple[str, ...]
    add: tuple[str, ...]
    sub: tuple[str, ...]
    mul: tuple[str, ...]
    question: tuple[str, ...]
    items: tuple[str, ...]
    negative_ok: bool  # a story where a negative running total still makes sense


_STORIES = (
    _Story(
        start=("{name} has {n} {item}.", "{name} starts the day with {n} {item}."),
        add=("{name} buys {n} more {item}.", "{name} finds {n} more {item}.", "{name} is given {n} more {item}."),
        sub=("{name} gives away {n} {item}.", "{name} loses {n} {item}.", "{name} sells {n} {item}."),
        mul=("{name} ends up with {n} times as many {item} as before.", "{name} multiplies the number of {item} by {n}."),
        question=("How many {item} does {name} have now?", "How many {item} does {name} have at the end?"),
        items=("apples", "coins", "marbles", "stickers", "stamps", "shells", "cards", "pencils", "books", "pages of notes"),
        negative_ok=False,
    ),
    _Story(
        start=("{name}'s account balance is {n} dollars.", "{name} opens an account with {n} dollars."),
        add=("{name} deposits {n} dollars.", "{name} earns {n} dollars and puts them in the account."),
        sub=("{name} withdraws {n} dollars.", "{name} pays a bill of {n} dollars from the account."),
        mul=("{name}'s balance is multiplied by {n}.",),
        question=("What is {name}'s balance now, in dollars?", "How many dollars are in {name}'s account at the end?"),
        items=("dollars",),
        negative_ok=True,
    ),
    _Story(
        start=("{name} starts a game with {n} points.", "{name} has {n} points in a game."),
        add=("{name} scores {n} points.", "{name} earns a bonus of {n} points."),
        sub=("{name} loses {n} points.", "{name} gets a penalty of {n} points."),
        mul=("{name}'s score is multiplied by {n}.", "{name} uses a power-up that multiplies the score by {n}."),
        question=("What is {name}'s score now?", "How many points does {name} have at the end?"),
        items=("points",),
        negative_ok=True,
    ),
)
_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Mia", "Noah", "Omar", "Priya", "Sam")
_CONNECTORS = ("Then ", "After that, ", "Next, ", "")
_EXPRESSION_TEMPLATES = ("What is {expr}?", "Compute {expr}.", "Calculate {expr}.", "Evaluate {expr}.", "Find the value of {expr}.")
_INSTRUCTION_VERBS = {"add": "add {n}", "sub": "subtract {n}", "mul": "multiply by {n}"}
_INSTRUCTION_QUESTIONS = ("What number do you get?", "What is the result?", "What is the final number?")


def _word_prompt(rng: random.Random, problem: _Problem) -> str:
    negative = min(problem.values()) < 0
    story = rng.choice([s for s in _STORIES if s.negative_ok or not negative])
    fill = {"name": rng.choice(_NAMES), "item": rng.choice(story.items)}
    sentences = [rng.choice(story.start).format(n=problem.operands[0], **fill)]
    for op, b in zip(problem.operations, problem.operands[1:]):
        sentences.append(rng.choice(_CONNECTORS) + rng.choice(getattr(story, op)).format(n=b, **fill))
    sentences.append(rng.choice(story.question).format(**fill))
    return " ".join(sentences)


def _instructions_prompt(rng: random.Random, problem: _Problem) -> str:
    steps = [_INSTRUCTION_VERBS[op].format(n=b) for op, b in zip(problem.operations, problem.operands[1:])]
    chain = ", then ".join(steps)
    return f"Start with {problem.operands[0]}. {chain[0].upper()}{chain[1:]}. {rng.choice(_INSTRUCTION_QUESTIONS)}"


def _prompt(rng: random.Random, problem: _Problem, phrasing: str) -> str:
    if phrasing == "word":
        return _word_prompt(rng, problem)
    if phrasing == "instructions":
        return _instructions_prompt(rng, problem)
    return rng.choice(_EXPRESSION_TEMPLATES).format(expr=problem.expression())


def _completion(problem: _Problem, style: str) -> str:
    """A short solution ending in `\\boxed{answer}`: the only part of the format a verifier relies on."""
    totals = problem.values()
    answer = totals[-1]
    final = f"The answer is \\boxed{{{answer}}}"
    if style == "equation":
        return f"{problem.expression()} = {answer}, so the answer is \\boxed{{{answer}}}"
    lines = []
    if style == "verbose":
        lines.append(f"Start with {problem.operands[0]}.")
    for op, a, b, result in zip(problem.operations, totals, problem.operands[1:], totals[1:]):
        step = f"{a} {_SYMBOL[op]} {b} = {result}"
        lines.append(f"{_INSTRUCTION_VERBS[op].format(n=b).capitalize()}: {step}." if style == "verbose" else step)
    lines.append(final)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Sets


def generate_arithmetic(config: ArithmeticConfig, exclude: Iterable[Mapping] = ()) -> list[dict]:
    """`config.num_examples` distinct problems (see the module docstring for the record format).

    `exclude` holds records of another set (e.g. the training set when building a validation set): no
    generated problem repeats one of their prompts or, for synthetic records, their expression (the same
    numbers under a different phrasing would still leak the answer).
    Raises ValueError when the knobs allow too few distinct problems.
    """
    rng = random.Random(config.seed)
    exclude = list(exclude)
    taken_prompts = {r["prompt"] for r in exclude if isinstance(r.get("prompt"), str)}
    taken_expressions = {r["expression"] for r in exclude if isinstance(r.get("expression"), str)}
    records: list[dict] = []
    attempts, max_attempts = 0, 100 * config.num_examples + 1000
    while len(records) < config.num_examples:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"ArithmeticConfig: found only {len(records)} distinct problems of the {config.num_examples} asked for "
                f"after {max_attempts} draws; widen min_digits..max_digits, min_steps..max_steps or operations ({config})"
            )
        problem = _draw_problem(rng, config)
        if problem is None:
            continue
        phrasing = rng.choice(config.phrasings)
        style = rng.choice(config.solution_styles)
        prompt = _prompt(rng, problem, phrasing)
        expression = problem.expression()
        if prompt in taken_prompts or expression in taken_expressions:
            continue
        taken_prompts.add(prompt)
        records.append(
            {
                "prompt": prompt,
                "completion": _completion(problem, style),
                "answer": str(problem.values()[-1]),
                "expression": expression,
                "operands": list(problem.operands),
                "operations": list(problem.operations),
                "num_steps": len(problem.operations),
                "phrasing": phrasing,
                "solution_style": style,
            }
        )
    return records


def disjoint_splits(config: ArithmeticConfig, sizes: Mapping[str, int]) -> dict[str, list[dict]]:
    """Several sets that share no prompt and no expression, e.g. `{"train": 1000, "val": 64, "test": 200}`.

    Split i is `generate_arithmetic(replace(config, num_examples=sizes[name], seed=config.seed + 100_003 * i),
    exclude=<all earlier splits>)`, so the first split equals `generate_arithmetic` with `config.seed` and
    each split depends only on the splits listed before it.
    """
    splits: dict[str, list[dict]] = {}
    earlier: list[dict] = []
    for i, (name, size) in enumerate(sizes.items()):
        split_config = replace(config, num_examples=size, seed=config.seed + 100_003 * i)
        splits[name] = generate_arithmetic(split_config, exclude=earlier)
        earlier = earlier + splits[name]
    return splits


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser(prog: str = "python -m aesl_lightning synthetic") -> argparse.ArgumentParser:
    d = ArithmeticConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate verifiable arithmetic word problems as JSONL records "
        "(prompt, completion ending in \\boxed{answer}, answer, metadata).",
    )
    add = parser.add_argument
    add("--out", required=True, help="JSONL file to write (written atomically)")
    add("--num-examples", type=int, default=d.num_examples, help="number of problems (default: %(default)s)")
    add("--seed", type=int, default=d.seed, help="generator seed: same seed, same problems (default: %(default)s)")
    add("--min-digits", type=int, default=d.min_digits, help="fewest digits of an operand (default: %(default)s)")
    add("--max-digits", type=int, default=d.max_digits, help="most digits of an operand (default: %(default)s)")
    add("--mul-max-digits", type=int, default=None, help="most digits of a multiplier (default: --max-digits)")
    add("--min-steps", type=int, default=d.min_steps, help="fewest operations per problem (default: %(default)s)")
    add("--max-steps", type=int, default=d.max_steps, help="most operations per problem (default: %(default)s)")
    add("--operations", nargs="+", choices=OPERATIONS, default=list(d.operations),
        help=f"operations to draw from (default: {' '.join(d.operations)})")
    add("--phrasings", nargs="+", choices=PHRASINGS, default=list(d.phrasings),
        help=f"prompt styles to draw from (default: {' '.join(d.phrasings)})")
    add("--solution-styles", nargs="+", choices=SOLUTION_STYLES, default=list(d.solution_styles),
        help=f"completion styles to draw from (default: {' '.join(d.solution_styles)})")
    add("--allow-negative", action="store_true", help="allow negative intermediate results and answers")
    add("--exclude", action="append", default=[], metavar="JSONL",
        help="JSONL set to stay disjoint from (repeatable), e.g. the training set")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m aesl_lightning synthetic --num-examples 500 --seed 0 --out data.jsonl`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ArithmeticConfig(
            num_examples=args.num_examples,
            seed=args.seed,
            min_digits=args.min_digits,
            max_digits=args.max_digits,
            mul_max_digits=args.mul_max_digits,
            min_steps=args.min_steps,
            max_steps=args.max_steps,
            operations=tuple(args.operations),
            phrasings=tuple(args.phrasings),
            solution_styles=tuple(args.solution_styles),
            allow_negative=args.allow_negative,
        )
        exclude = [record for path in args.exclude for record in read_jsonl(path)]
        records = generate_arithmetic(config, exclude=exclude)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} problems to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
