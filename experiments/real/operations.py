"""Computation paths of a word-problem solution: the ordered operations it writes in its arithmetic lines.

`computation_path("After buying: 7 + 5 = 12\\nLeft: 12 - 3 = 9\\nThe answer is \\\\boxed{9}.")` is
`("5 + 7", "12 - 3")`: each `x op y (op z ...) = r` found in the text, in order, as its left-hand side with the
numbers as written (`$` and thousands separators dropped) and the result left out, so an arithmetic slip in a
result does not make a new path by itself (a slip does change the operands of the next step). The operands of a
single `+` or `*` are sorted (7 + 5 and 5 + 7 are one path); `-` and `/` keep their order. `x`, `×` and `÷` read
as `*` and `/`. A text with no arithmetic line has the empty path `()` (e.g. an answer given without work).

`distinct_paths(texts, compliant)` counts the distinct paths among the format-compliant samples of one problem:
with k samples of one format the measure moves with the strategies, not with template length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = r"\$?\d[\d,]*(?:\.\d+)?"
_OPERATOR = r"(?:[-+*/×÷]|(?<=\s)x(?=\s))"
_EQUATION = re.compile(rf"({_NUMBER}(?:\s*{_OPERATOR}\s*{_NUMBER})+)\s*=\s*-?{_NUMBER}")
_TOKEN = re.compile(rf"{_NUMBER}|{_OPERATOR}")
_CANONICAL = {"×": "*", "x": "*", "÷": "/"}


def _number(token: str) -> str:
    value = token.replace("$", "").replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def _operation(lhs: str) -> str:
    tokens = _TOKEN.findall(lhs)
    numbers = [_number(t) for t in tokens[0::2]]
    operators = [_CANONICAL.get(t, t) for t in tokens[1::2]]
    if len(operators) == 1 and operators[0] in "+*":
        numbers = sorted(numbers, key=lambda v: (float(v), v))
    out = numbers[0]
    for op, value in zip(operators, numbers[1:]):
        out += f" {op} {value}"
    return out


def computation_path(text: str) -> tuple[str, ...]:
    """The ordered operations written in `text` (module docstring)."""
    return tuple(_operation(m.group(1)) for m in _EQUATION.finditer(text))


def distinct_paths(texts: Sequence[str], compliant: Sequence[int | bool]) -> int:
    """Distinct computation paths among the samples with `compliant` true (0 when none is compliant)."""
    if len(texts) != len(compliant):
        raise ValueError(f"distinct_paths: {len(texts)} texts and {len(compliant)} compliance flags")
    return len({computation_path(t) for t, ok in zip(texts, compliant) if ok})
