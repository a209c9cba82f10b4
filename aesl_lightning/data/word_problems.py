"""Multi-step arithmetic word problems for the real-model track: a compact chain of thought ending in `\\boxed{}`.

A problem is a story template (`TEMPLATES`: 18 stories of 1 to 4 operations) filled with a name, an item and
small integers, and a list of steps `result_i = left op right` over the integers and earlier results (`+`, `-`, `*`, exact `/`). Every
intermediate result is a positive integer. The solution has one line per step and a boxed final answer:

    After buying: 7 + 5 = 12
    After giving some away: 12 - 3 = 9
    The answer is \\boxed{9}.

Splits are disjoint by construction: a problem's identity is its template and numbers (`key`, names and items
left out, so a paraphrase is the same problem), and `split_of(key)` hashes it to exactly one split; a split
draws from its own seeded generator and keeps only problems of its bucket. So no problem is in two splits,
and each split depends on its own seed and size only (growing the RL set never changes the test set).

Records (TRL formats; the extra columns are kept by the readers and passed to reward functions):

- SFT splits (`coldstart`, `val`): `{"prompt", "completion", "answer", "template", "num_ops", "key", "expression"}`
- RL / evaluation splits (`rl`, `test`, `test_hard`): `{"prompt", "answer", "template", "num_ops", "key", "expression"}`

`expression` is the computation as one fully parenthesised formula (`((7 + 5) - 3)`) for independent checks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from aesl_lightning.data.jsonl import write_jsonl

SPLITS: tuple[str, ...] = ("coldstart", "val", "rl", "test", "test_hard")
SFT_SPLITS: tuple[str, ...] = ("coldstart", "val")
_DRAWS_PER_TEMPLATE = 500  # number draws per template choice before another template is tried
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: Fraction(x, y)}
_PEOPLE = (("Mia", "she"), ("Ben", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Liam", "he"), ("Zoe", "she"),
           ("Omar", "he"), ("Lena", "she"), ("Sam", "he"), ("Priya", "she"), ("Hugo", "he"), ("Nina", "she"), ("Jonas", "he"))


@dataclass(frozen=True)
class Template:
    """A story with numeric slots and the steps that solve it.

    `numbers` maps each slot to `(low, high, kind)`: "n" slots (quantities) are scaled by the config's `scale`,
    "f" slots (factors, divisors, counts of days) grow by its `factor_boost`. `steps` are `(left, op, right,
    note)` with left/right a slot or `r<i>` (the result of step i, from 1); the last step is the answer.
    """

    name: str
    text: str
    numbers: Mapping[str, tuple[int, int, str]]
    steps: tuple[tuple[str, str, str, str], ...]
    items: tuple[str, ...] = ("apples",)

    @property
    def num_ops(self) -> int:
        return len(self.steps)


_T = Template
TEMPLATES: tuple[Template, ...] = (
    _T("buy1", "{name} has {a} {item}. {Pron} buys {b} more {item}. How many {item} does {name} have now?",
       {"a": (2, 12, "n"), "b": (2, 9, "n")}, (("a", "+", "b", "Now"),), ("apples", "marbles", "stickers", "cards")),
    _T("give1", "{name} has {a} {item}. {Pron} gives {b} {item} to {friend}. How many {item} does {name} have left?",
       {"a": (5, 15, "n"), "b": (2, 9, "n")}, (("a", "-", "b", "Left"),), ("apples", "coins", "pencils", "shells")),
    _T("boxes1", "{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have?",
       {"a": (2, 5, "f"), "b": (2, 6, "n")}, (("a", "*", "b", "In the boxes"),), ("crayons", "cookies", "buttons")),
    _T("shop", "{name} has {a} {item}. {Pron} buys {b} more {item} and then gives {c} {item} to {friend}. How many {item} does {name} have now?",
       {"a": (3, 20, "n"), "b": (2, 15, "n"), "c": (2, 20, "n")}, (("a", "+", "b", "After buying"), ("r1", "-", "c", "After giving some away")),
       ("apples", "marbles", "stickers", "cards", "shells")),
    _T("bags", "{name} has {a} bags with {b} {item} in each bag. {Pron} gives away {c} {item}. How many {item} does {name} have left?",
       {"a": (2, 6, "f"), "b": (2, 10, "n"), "c": (1, 20, "n")}, (("a", "*", "b", "In the bags"), ("r1", "-", "c", "Left")),
       ("candies", "marbles", "buttons", "beads")),
    _T("price", "{name} buys {c} {item} that cost {a} dollars each and a bag that costs {b} dollars. How many dollars does {name} spend?",
       {"a": (2, 9, "f"), "b": (2, 15, "n"), "c": (2, 6, "f")}, (("c", "*", "a", "Cost of the {item}"), ("r1", "+", "b", "Total")),
       ("notebooks", "pens", "toy cars", "books")),
    _T("share", "{name} bakes {a} {item} in the morning and {b} more in the afternoon. {Pron} shares them equally among {c} friends. "
       "How many {item} does each friend get?",
       {"a": (4, 20, "n"), "b": (2, 20, "n"), "c": (2, 6, "f")}, (("a", "+", "b", "Baked"), ("r1", "/", "c", "Each friend")),
       ("cookies", "muffins", "cupcakes")),
    _T("change", "{name} has {a} dollars. {Pron} buys {b} {item} that cost {c} dollars each. How many dollars does {name} have left?",
       {"a": (10, 50, "n"), "b": (2, 6, "f"), "c": (2, 9, "f")}, (("b", "*", "c", "Spent"), ("a", "-", "r1", "Left")),
       ("tickets", "comics", "sandwiches")),
    _T("garden", "A garden has {a} rows with {b} {item} in each row. Then {c} more {item} are planted. How many {item} are in the garden now?",
       {"a": (2, 8, "f"), "b": (2, 10, "n"), "c": (2, 20, "n")}, (("a", "*", "b", "In the rows"), ("r1", "+", "c", "Now")),
       ("tulips", "roses", "carrots")),
    _T("together", "{name} has {a} {item}. {friend} has {b} more {item} than {name}. How many {item} do they have together?",
       {"a": (3, 20, "n"), "b": (2, 15, "n")}, (("a", "+", "b", "{friend} has"), ("a", "+", "r1", "Together")),
       ("stamps", "coins", "pencils", "books")),
    _T("times", "{name} has {a} {item}. {friend} has {b} times as many {item} as {name}, and then {friend} gives away {c} of them. "
       "How many {item} does {friend} have now?",
       {"a": (2, 10, "n"), "b": (2, 5, "f"), "c": (1, 15, "n")}, (("a", "*", "b", "{friend} had"), ("r1", "-", "c", "Now")),
       ("stickers", "marbles", "coins")),
    _T("shop3", "{name} has {a} {item}. {Pron} buys {b} more, gives {c} to {friend}, and then finds {d} more. How many {item} does {name} have now?",
       {"a": (3, 20, "n"), "b": (2, 15, "n"), "c": (2, 20, "n"), "d": (2, 12, "n")},
       (("a", "+", "b", "After buying"), ("r1", "-", "c", "After giving"), ("r2", "+", "d", "After finding")), ("shells", "cards", "apples")),
    _T("price3", "{name} buys {c} pens at {a} dollars each and {d} notebooks at {b} dollars each. How many dollars does {name} spend?",
       {"a": (2, 9, "f"), "b": (2, 9, "f"), "c": (2, 6, "f"), "d": (2, 6, "f")},
       (("c", "*", "a", "Pens"), ("d", "*", "b", "Notebooks"), ("r1", "+", "r2", "Total"))),
    _T("share3", "{name} has {a} packs with {b} {item} in each pack. {Pron} loses {c} {item} and shares the rest equally among {d} friends. "
       "How many {item} does each friend get?",
       {"a": (2, 6, "f"), "b": (3, 10, "n"), "c": (1, 10, "n"), "d": (2, 5, "f")},
       (("a", "*", "b", "In the packs"), ("r1", "-", "c", "After losing some"), ("r2", "/", "d", "Each friend")), ("stickers", "cards", "crayons")),
    _T("change3", "{name} has {a} dollars. {Pron} buys {b} {item} at {c} dollars each and a drink for {d} dollars. "
       "How many dollars does {name} have left?",
       {"a": (20, 60, "n"), "b": (2, 5, "f"), "c": (2, 9, "f"), "d": (2, 6, "n")},
       (("b", "*", "c", "The {item} cost"), ("r1", "+", "d", "Spent"), ("a", "-", "r2", "Left")), ("sandwiches", "tickets", "magazines")),
    _T("reading3", "{name} reads {a} pages a day for {b} days and then {c} pages a day for {d} days. How many pages does {name} read in all?",
       {"a": (2, 12, "n"), "b": (2, 6, "f"), "c": (2, 12, "n"), "d": (2, 6, "f")},
       (("a", "*", "b", "First days"), ("c", "*", "d", "Next days"), ("r1", "+", "r2", "In all"))),
    _T("trio4", "{name} has {a} {item}. {friend} has {b} more {item} than {name}, and {friend2} has {c} fewer {item} than {friend}. "
       "How many {item} do the three of them have together?",
       {"a": (3, 20, "n"), "b": (2, 12, "n"), "c": (1, 10, "n")},
       (("a", "+", "b", "{friend} has"), ("r1", "-", "c", "{friend2} has"), ("a", "+", "r1", "{name} and {friend}"), ("r3", "+", "r2", "All three")),
       ("marbles", "stamps", "coins")),
    _T("party4", "{name} buys {a} boxes with {b} {item} in each box and {c} loose {item}. {Pron} eats {d} of them and shares the rest "
       "equally among {e} friends. How many {item} does each friend get?",
       {"a": (2, 5, "f"), "b": (3, 10, "n"), "c": (2, 10, "n"), "d": (1, 6, "n"), "e": (2, 5, "f")},
       (("a", "*", "b", "In the boxes"), ("r1", "+", "c", "With the loose ones"), ("r2", "-", "d", "After eating"), ("r3", "/", "e", "Each friend")),
       ("chocolates", "cookies", "candies")),
)
TEMPLATES_BY_NAME = {t.name: t for t in TEMPLATES}


@dataclass(frozen=True)
class WordProblemConfig:
    """Difficulty of one split.

    Args:
        min_ops: Fewest steps of a template to draw from.
        max_ops: Most steps of a template to draw from.
        scale: Upper bound multiplier of quantity ("n") slots.
        factor_boost: Added to the upper bound of factor / divisor ("f") slots.
        instruction: Sentence appended to every prompt (the answer format asked for); None appends nothing.
        only: Names of the templates to use (None: all of the allowed step counts).
    """

    min_ops: int = 1
    max_ops: int = 2
    scale: int = 1
    factor_boost: int = 0
    instruction: str | None = None
    only: tuple[str, ...] | None = None

    def templates(self) -> tuple[Template, ...]:
        unknown = set(self.only or ()) - set(TEMPLATES_BY_NAME)
        if unknown:
            raise ValueError(f"WordProblemConfig.only: unknown templates {sorted(unknown)} (known: {sorted(TEMPLATES_BY_NAME)})")
        chosen = tuple(t for t in TEMPLATES if self.min_ops <= t.num_ops <= self.max_ops and (self.only is None or t.name in self.only))
        if not chosen:
            raise ValueError(f"WordProblemConfig: no template has {self.min_ops}..{self.max_ops} steps "
                             f"(templates have {sorted({t.num_ops for t in TEMPLATES})}; only={self.only})")
        return chosen


# The main splits: 1-2 operations (the pre-flight found SmolLM2-135M-Instruct at 0/32 greedy on 2-operation
# problems and 3/48 on 1-2 operations: experiments/results/real/preflight.md). The hard split: 2-3 operations
# over numbers up to twice as large.
EASY = WordProblemConfig()
HARD = WordProblemConfig(min_ops=2, max_ops=3, scale=2, factor_boost=2)


def split_of(key: str, splits: tuple[str, ...] = SPLITS) -> str:
    """The one split a problem may appear in: sha256(key) modulo the number of splits."""
    return splits[int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % len(splits)]


def solve(template: Template, values: Mapping[str, int]) -> list[Fraction] | None:
    """The results of the template's steps, or None when one is not a positive integer."""
    env: dict[str, Fraction] = {k: Fraction(v) for k, v in values.items()}
    results = []
    for i, (left, op, right, _) in enumerate(template.steps, start=1):
        if op == "/" and env[right] == 0:
            return None
        value = _OPS[op](env[left], env[right])
        if value.denominator != 1 or value < 1:
            return None
        env[f"r{i}"] = value
        results.append(value)
    return results


def expression(template: Template, values: Mapping[str, int]) -> str:
    """The computation as one fully parenthesised formula of the template's numbers."""
    env = {k: str(v) for k, v in values.items()}
    for i, (left, op, right, _) in enumerate(template.steps, start=1):
        env[f"r{i}"] = f"({env[left]} {op} {env[right]})"
    return env[f"r{template.num_ops}"]


def _draw_values(rng: random.Random, template: Template, config: WordProblemConfig) -> dict[str, int]:
    values = {}
    for slot, (low, high, kind) in template.numbers.items():
        top = high * config.scale if kind == "n" else high + config.factor_boost
        values[slot] = rng.randint(low, top)
    return values


def _record(rng: random.Random, template: Template, values: dict[str, int], results: list[Fraction], config: WordProblemConfig,
            with_completion: bool) -> dict:
    (name, pronoun), = rng.sample(_PEOPLE, 1)
    friend, friend2 = rng.sample([p for p, _ in _PEOPLE if p != name], 2)
    fill = {"name": name, "Pron": pronoun.capitalize(), "friend": friend, "friend2": friend2, "item": rng.choice(template.items)}
    prompt = template.text.format(**fill, **values)
    if config.instruction:
        prompt = f"{prompt} {config.instruction}"
    answer = str(int(results[-1]))
    record = {"prompt": prompt}
    if with_completion:
        env = {k: str(v) for k, v in values.items()}
        lines = []
        for i, ((left, op, right, note), result) in enumerate(zip(template.steps, results), start=1):
            lines.append(f"{note.format(**fill)}: {env[left]} {op} {env[right]} = {int(result)}")
            env[f"r{i}"] = str(int(result))
        record["completion"] = "\n".join(lines + [f"The answer is \\boxed{{{answer}}}."])
    record.update(answer=answer, template=template.name, num_ops=template.num_ops, key=problem_key(template, values),
                  expression=expression(template, values))
    return record


def problem_key(template: Template, values: Mapping[str, int]) -> str:
    """A problem's identity: template and numbers (names, items and phrasing excluded)."""
    return template.name + ":" + ",".join(f"{k}={values[k]}" for k in sorted(values))


def generate_split(split: str, size: int, config: WordProblemConfig, seed: int) -> list[dict]:
    """`size` distinct problems of the bucket `split` (see the module docstring), deterministic in `seed`.

    Raises ValueError when the templates allow too few distinct problems in the bucket.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # The split's name enters the seed, so two splits given the same seed still draw independent streams.
    rng = random.Random(f"{seed}:{split}")
    templates = config.templates()
    records, seen = [], set()
    misses, limit = 0, 20 * len(templates)
    while len(records) < size:
        if misses > limit:  # that many template choices in a row found no new problem: the bucket is (nearly) exhausted
            raise ValueError(f"{split}: found only {len(records)} of {size} distinct problems ({limit} template choices in a row "
                             f"found none new; {config}); widen the number ranges or allow more templates")
        misses += 1
        # Template first, then numbers until they fit it: every template is equally likely, whatever share of
        # its draws the constraints (positive results, exact division) or the bucket reject.
        template = rng.choice(templates)
        for _ in range(_DRAWS_PER_TEMPLATE):
            values = _draw_values(rng, template, config)
            key = problem_key(template, values)
            results = None if key in seen or split_of(key) != split else solve(template, values)
            if results is not None:
                seen.add(key)
                records.append(_record(rng, template, values, results, config, with_completion=split in SFT_SPLITS))
                misses = 0
                break
    return records


DEFAULT_SIZES = {"coldstart": 48, "val": 64, "rl": 1024, "test": 256, "test_hard": 256}


def make_splits(sizes: Mapping[str, int] = DEFAULT_SIZES, seed: int = 0, easy: WordProblemConfig = EASY,
                hard: WordProblemConfig = HARD) -> dict[str, list[dict]]:
    """Every split: `test_hard` from `hard`, the others from `easy`."""
    return {split: generate_split(split, size, hard if split == "test_hard" else easy, seed) for split, size in sizes.items()}


def write_splits(splits: Mapping[str, list[dict]], folder: str | Path) -> dict[str, Path]:
    """`<folder>/<split>.jsonl` for each split (atomic writes); returns the paths."""
    paths = {}
    for split, records in splits.items():
        paths[split] = Path(folder) / f"{split}.jsonl"
        write_jsonl(records, paths[split])
    return paths
