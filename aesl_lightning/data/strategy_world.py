"""A controlled world for the paper's mechanism: sums solved by strategies whose use can be counted exactly.

Every problem is `a + b` with two three-digit numbers. Three strategies solve it, each with its own surface
form, so that a labeller reads off which one a completion used (the ground-truth diversity the paper's
entropy and self-BLEU only approximate):

- `direct`:  `247+538 = 785` (one shot: the carries are done in the head; short and the least reliable);
- `round`:   `538 = 540-2. 247+540 = 787. 787-2 = 785` (round the second number to a ten, then adjust);
- `column`:  `7+8+0 = 15 carry 1. 4+3+1 = 8 carry 0. 2+5+0 = 7 carry 0. so 785` (digit by digit, longest).

Two answer formats wrap the same strategy body:

- native (the pre-training corpus):  `<body>\\nAnswer: 785`;
- target (the cold start, rewarded in RL): `Solution:\\n<body>\\nThe answer is \\boxed{785}.`

The base model learns all three strategies in the native format; the cold start teaches the target format
with one strategy. Everything here is a pure function of a seed: the same seed gives the same data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

STRATEGIES = ("direct", "round", "column")
OTHER = "other"
FORMATS = ("native", "target")
_PHRASINGS = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    def prompt(self, phrasing: int = 0) -> str:
        return _PHRASINGS[phrasing % len(_PHRASINGS)].format(a=self.a, b=self.b)


def direct_body(p: Problem) -> str:
    return f"{p.a}+{p.b} = {p.answer}"


def round_body(p: Problem) -> str:
    """Round b to the nearest ten r (ones 0-4 down, 5-9 up), add r, then adjust by r - b."""
    ones = p.b % 10
    r = p.b - ones if ones < 5 else p.b + (10 - ones)
    adjust = f"-{r - p.b}" if r >= p.b else f"+{p.b - r}"
    partial = p.a + r
    return f"{p.b} = {r}{adjust}. {p.a}+{r} = {partial}. {partial}{adjust} = {p.answer}"


def column_body(p: Problem) -> str:
    """Digit by digit from the ones, with the carry written at every column."""
    da, db = f"{p.a:03d}"[::-1], f"{p.b:03d}"[::-1]
    carry, parts = 0, []
    for x, y in zip(da, db):
        s = int(x) + int(y) + carry
        parts.append(f"{x}+{y}+{carry} = {s} carry {s // 10}.")
        carry = s // 10
    return " ".join(parts) + f" so {p.answer}"


_BODIES = {"direct": direct_body, "round": round_body, "column": column_body}


def solution(p: Problem, strategy: str, fmt: str) -> str:
    """The completion for `p` written with `strategy` in format `fmt` (`native` or `target`)."""
    if strategy not in _BODIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    body = _BODIES[strategy](p)
    if fmt == "native":
        return f"{body}\nAnswer: {p.answer}"
    if fmt == "target":
        return f"Solution:\n{body}\nThe answer is \\boxed{{{p.answer}}}."
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


# ----------------------------------------------------------------------------------------------------
# Reading completions back

_DIRECT = re.compile(r"\d+\+\d+ = -?\d+")
_ROUND = re.compile(r"\d+ = \d+[+-]\d+\. \d+\+\d+ = -?\d+\. -?\d+[+-]\d+ = -?\d+")
_COLUMN = re.compile(r"\d\+\d\+\d = \d+ carry \d\.( \d\+\d\+\d = \d+ carry \d\.)* so -?\d+")
_TARGET = re.compile(r"Solution:\n(?P<body>[^\n]*)\nThe answer is \\boxed\{(?P<answer>[^{}\n]*)\}\.")
_NATIVE = re.compile(r"(?P<body>[^\n]*)\nAnswer: (?P<answer>[^\n]*)")


def body_of(completion: str) -> str:
    """The strategy line of a completion: the line after `Solution:` if present, else the first line."""
    lines = completion.strip().split("\n")
    if lines and lines[0].strip() == "Solution:":
        lines = lines[1:]
    return lines[0].strip() if lines else ""


def label_strategy(completion: str) -> str:
    """The strategy a completion used, read from the surface form of its strategy line, or `other`.

    The form decides, not the arithmetic: a `column` line with a wrong digit is still `column`, so the
    strategy's success rate can be measured. A line that mixes forms or matches none is `other`.
    """
    body = body_of(completion)
    for name, pattern in (("column", _COLUMN), ("round", _ROUND), ("direct", _DIRECT)):
        if pattern.fullmatch(body):
            return name
    return OTHER


def answer_format(completion: str) -> str:
    """`target` when the whole completion is in the target format, `native` for the native one, else `other`."""
    text = completion.strip()
    if _TARGET.fullmatch(text):
        return "target"
    if _NATIVE.fullmatch(text):
        return "native"
    return OTHER


def target_answer(completion: str) -> int | None:
    """The integer in the completion's `\\boxed{}` when it is in the target format, else None (no credit)."""
    m = _TARGET.fullmatch(completion.strip())
    if m is None or not re.fullmatch(r"-?\d{1,6}", m["answer"].strip()):
        return None
    return int(m["answer"])


def is_correct(completion: str, answer: int) -> bool:
    """Correct answer in the target format (the RL reward and the study's accuracy)."""
    return target_answer(completion) == answer


# ----------------------------------------------------------------------------------------------------
# Data sets


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and mixtures of the world's data sets (see the study's plan.md for the chosen values)."""

    pretrain_size: int = 20000
    pretrain_mix: tuple[float, float, float] = (0.4, 0.3, 0.3)  # direct, round, column
    target_share: float = 0.0  # share of pre-training solutions written in the target format (strategies mixed alike)
    coldstart_size: int = 48
    val_size: int = 64
    rl_size: int = 512
    test_size: int = 256
    data_seed: int = 1234  # the fixed splits (pre-training, validation, RL pool, test)

    def __post_init__(self) -> None:
        if len(self.pretrain_mix) != len(STRATEGIES) or any(w < 0 for w in self.pretrain_mix) or sum(self.pretrain_mix) <= 0:
            raise ValueError(f"WorldConfig.pretrain_mix must be {len(STRATEGIES)} non-negative weights, got {self.pretrain_mix}")
        if not 0.0 <= self.target_share <= 1.0:
            raise ValueError(f"WorldConfig.target_share must be in [0, 1], got {self.target_share}")
        for name in ("pretrain_size", "coldstart_size", "val_size", "rl_size", "test_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")


def draw_problems(rng: random.Random, n: int, exclude: set[tuple[int, int]]) -> list[Problem]:
    """`n` distinct problems with three-digit operands, none in `exclude` (which grows with them)."""
    out: list[Problem] = []
    while len(out) < n:
        key = (rng.randint(100, 999), rng.randint(100, 999))
        if key in exclude:
            continue
        exclude.add(key)
        out.append(Problem(*key))
    return out


def _sft_record(p: Problem, phrasing: int, strategy: str, fmt: str) -> dict:
    return {"prompt": p.prompt(phrasing), "completion": solution(p, strategy, fmt), "answer": str(p.answer), "strategy": strategy}


def _prompt_record(p: Problem, phrasing: int) -> dict:
    return {"prompt": p.prompt(phrasing), "answer": str(p.answer), "a": p.a, "b": p.b}


def _prompt_splits(config: WorldConfig) -> tuple[random.Random, set[tuple[int, int]], dict[str, list[dict]], list[Problem]]:
    """The shared prompt splits, then a block of 4,096 problems reserved for the seeds' cold starts (so a cold
    start never overlaps a shared split); returns the generator and the problems drawn so far with them."""
    rng = random.Random(config.data_seed)
    seen: set[tuple[int, int]] = set()
    splits: dict[str, list[dict]] = {}
    for name, n in (("val", config.val_size), ("test", config.test_size), ("rl", config.rl_size)):
        splits[name] = [_prompt_record(p, rng.randrange(len(_PHRASINGS))) for p in draw_problems(rng, n, seen)]
    reserved = draw_problems(rng, 4096, seen)
    return rng, seen, splits, reserved


def fixed_splits(config: WorldConfig) -> dict[str, list[dict]]:
    """The splits every study seed shares: `pretrain` (native format but for `target_share` of it, mixed strategies), `pretrain_val`,
    `val` (the SFT validation grid's problems), `rl` (the RL prompt pool) and `test`; disjoint problems."""
    rng, seen, splits, _ = _prompt_splits(config)
    pretrain = draw_problems(rng, config.pretrain_size + 256, seen)
    strategies = rng.choices(STRATEGIES, weights=config.pretrain_mix, k=len(pretrain))
    formats = ["native"] * len(pretrain)
    if config.target_share > 0:  # drawn from their own generator: the splits above and the strategies stay as without
        picker = random.Random(f"target-{config.data_seed}")
        formats = ["target" if picker.random() < config.target_share else "native" for _ in pretrain]
    records = [_sft_record(p, rng.randrange(len(_PHRASINGS)), s, f) for p, s, f in zip(pretrain, strategies, formats)]
    splits["pretrain"], splits["pretrain_val"] = records[: config.pretrain_size], records[config.pretrain_size :]
    return splits


def coldstart(config: WorldConfig, seed: int, strategies: Sequence[str]) -> list[dict]:
    """The cold-start set of study seed `seed`: `coldstart_size` problems in the target format, strategies
    cycling through `strategies` (one name: a narrow cold start). Drawn from the reserved block, so it never
    overlaps the shared splits; the same seed gives the same problems for every arm and every strategy list."""
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"cold-start strategy must be one of {STRATEGIES}, got {s!r}")
    if config.coldstart_size > 4096:
        raise ValueError(f"WorldConfig.coldstart_size must be <= 4096, got {config.coldstart_size}")
    reserved = _prompt_splits(config)[3]
    picker = random.Random(f"coldstart-{config.data_seed}-{seed}")
    chosen = picker.sample(reserved, config.coldstart_size)
    return [_sft_record(p, picker.randrange(len(_PHRASINGS)), strategies[i % len(strategies)], "target") for i, p in enumerate(chosen)]


def strategy_counts(completions: Iterable[str]) -> dict[str, int]:
    """How many completions used each strategy (and `other`)."""
    counts = {s: 0 for s in (*STRATEGIES, OTHER)}
    for c in completions:
        counts[label_strategy(c)] += 1
    return counts


def target_reward(prompts: Sequence, completions: Sequence, answer: Sequence, **_) -> list[float]:
    """TRL-signature reward of the strategy world: 1.0 for the right answer in the target format, else 0.0."""
    out = []
    for completion, gold in zip(completions, answer):
        text = completion if isinstance(completion, str) else (completion[-1]["content"] if completion else "")
        out.append(1.0 if is_correct(text, int(gold)) else 0.0)
    return out
