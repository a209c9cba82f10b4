"""Which answer a completion commits to, and the cheap checks decided without math-verify.

Which answer counts (`final_answers`), so that hedging cannot be rewarded:

- With `\\boxed{...}`: every top-level, complete `\\boxed{}` is an answer the completion commits to. A
  `\\boxed{` that is never closed (`\\boxed{42} wait no \\boxed{43`) makes the completion score 0, and so
  does any boxed answer that is wrong: several different answers can never all be right, so the last one
  alone is never enough. More than `MAX_BOXED` boxes score 0.
- Without a box (the documented fallback): the text after the last "answer is" / "answer:" (any case), else
  the last non-empty line. If it holds `$...$` or `\\(...\\)` maths, that is the answer (more than one
  distinct segment scores 0); else its numbers, which must all be the same number ("The answer is 42 or
  43" scores 0; "12 + 35 = 47" without a box is ambiguous and scores 0 too).
- An answer joined by "or" (`\\lor`, `\\vee`, the word) scores 0 unless the ground truth has one too.
- An answer that names several values (`43 ó 42`, `43 \\mid 42`, `42 \\approx 43`, `2, 3`: the rule of
  `aesl_lightning.scoring.answer_values`, which reads the grammar, not a list of words) is split into its values when
  the gold names one value, and scores 1 only if every value equals the gold (`6 \\times 7 = 42`); values
  named inside brackets or `\\text{}` (`(43 ó 42)`) then score 0. A gold that names several values (a list,
  tuple, set, interval) leaves the answer whole, for math-verify to compare as a set.

Cheap pre-filters (`prefilter_reason`) reject pathological answers in microseconds: longer than
`MAX_ANSWER_CHARS`, braces nested deeper than `MAX_BRACE_DEPTH`, digit runs longer than `MAX_DIGITS` (or the
gold's), exponent towers, exponents above `MAX_EXPONENT` (or multiplying to more than
`MAX_EXPONENT_PRODUCT`, `(10^{1000})^{9000}`), `1e...` above `MAX_SCIENTIFIC_EXPONENT`, binomials of numbers
above 99999, factorials of numbers above `MAX_FACTORIAL` or of expressions (`(10!)!`),
control characters, null bytes, lone surrogates and Python code (`__`, `import`, `eval`, `;`, ...); completions longer than `MAX_COMPLETION_CHARS` score 0.
Plain numbers are compared here, exactly, as fractions (`plain_compare`); everything else is for
`aesl_lightning.scoring.verifier`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from aesl_lightning.scoring.answer_values import answer_values, names_several_values

__all__ = [
    "GOLD_CHARS",
    "MAX_ANSWER_CHARS",
    "MAX_COMPLETION_CHARS",
    "completion_text",
    "boxed_spans",
    "extract_boxed",
    "final_answers",
    "prefilter_reason",
    "gold_reason",
    "or_reason",
    "plain_compare",
    "single_values",
]

BOXED = "\\boxed{"
MAX_COMPLETION_CHARS = 100_000
MAX_ANSWER_CHARS = 256
MAX_BRACE_DEPTH = 6
MAX_DIGITS = 40
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000
MAX_EXPONENT_PRODUCT = 1_000_000
MAX_SCIENTIFIC_EXPONENT = 100
MAX_BOXED = 16
GOLD_CHARS = 4 * MAX_ANSWER_CHARS

_BOX_RE = re.compile(r"\\boxed\s*\{")
_BRACE_RE = re.compile(r"[{}]")
_ANSWER_MARKER = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]*\d)|(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")
_PLAIN_NUMBER = re.compile(r"^\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*$")
_DIGIT_RUN = re.compile(r"\d+")
_OR = re.compile(r"\\lor\b|\\vee\b|(?<![A-Za-z])or(?![A-Za-z])")
_EXPONENT_TOKEN = re.compile(r"-?\s*\d+(?:\.\d+)?|\\?[A-Za-z]+")
_FACTORIAL = re.compile(r"(\d+)\s*!|\\factorial\s*\{?\s*(\d+)")
# Python, not maths: math-verify's plain-expression fallback hands text to sympy's parser, which evaluates it.
_CODE = re.compile(r"__|\b(?:import|exec|eval|lambda|getattr|setattr|globals|locals|compile|open|system|subprocess)\b|[;`@]")
_SCIENTIFIC = re.compile(r"\d\s*[eE]\s*([+-]?\d+)")
_BINOMIAL = re.compile(r"\\[dt]?binom\s*\{[^{}]*\}\s*\{[^{}]*\}|\\choose")
_GROUP_FACTORIAL = re.compile(r"[)}\]|!]\s*!")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as TRL conversational messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def boxed_spans(text: str) -> tuple[list[tuple[int, int]], int]:
    """(content spans of the top-level complete boxes, start of the last never-closed `\boxed{` or -1), in one
    pass over the braces (linear time, however the boxes nest)."""
    starts = [(m.start(), m.end() - 1) for m in _BOX_RE.finditer(text)]  # (box start, its '{')
    if not starts:
        return [], -1
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    spans, unclosed, end_of_last = [], -1, -1
    for start, brace in starts:
        if brace not in close:
            unclosed = start
            continue
        if start < end_of_last:  # nested inside the previous top-level box
            continue
        spans.append((brace + 1, close[brace]))
        end_of_last = close[brace]
    return spans, unclosed


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level `\boxed{...}` in `text`, with nested braces matched; None if there is
    none or a `\boxed{` after it is never closed."""
    spans, unclosed = boxed_spans(text)
    if not spans or unclosed > spans[-1][0]:
        return None
    return text[spans[-1][0] : spans[-1][1]].strip()


def final_answers(text: str) -> tuple[list[str], str | None]:
    """(the answers `text` commits to, each to be wrapped for math-verify, or a reason for scoring 0).

    Boxed answers come back as `\\boxed{...}`, maths segments as `$...$`, numbers as plain strings; see the
    module docstring for the rule.
    """
    if len(text) > MAX_COMPLETION_CHARS:
        return [], f"completion longer than {MAX_COMPLETION_CHARS} characters"
    spans, unclosed = boxed_spans(text)
    if unclosed >= 0:
        return [], "a \\boxed{ that is never closed"
    if spans:
        if len(spans) > MAX_BOXED:
            return [], f"more than {MAX_BOXED} boxed answers"
        distinct = list(dict.fromkeys(" ".join(text[a:b].split()) for a, b in spans))
        return [f"\\boxed{{{answer}}}" for answer in distinct], None
    marker = None
    for marker in _ANSWER_MARKER.finditer(text):
        pass
    if marker is not None:
        region = text[marker.end() :]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        region = lines[-1] if lines else ""
    segments = list(dict.fromkeys(" ".join(next(g for g in m.groups() if g is not None).split())
                                  for m in _MATH_SEGMENT.finditer(region)))
    if len(segments) > 1:
        return [], "several different maths answers"
    if segments:
        return [f"${segments[0]}$"], None
    numbers = {_as_fraction(n) for n in set(_NUMBER.findall(region))}
    numbers.discard(None)
    if len(numbers) > 1:
        return [], "several different numbers in the final answer"
    if not numbers:
        return [], "no answer found"
    (value,) = numbers
    return [_format_fraction(value)], None


def _as_fraction(number: str) -> Fraction | None:
    try:
        return Fraction(number.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def prefilter_reason(answer: str, gold: str = "") -> str | None:
    """Why `answer` is rejected without parsing (None: it may be parsed). Cost: a few regex scans of at most
    `MAX_ANSWER_CHARS` characters. Limits that a legitimate `gold` exceeds are raised to the gold's."""
    if len(answer) > max(MAX_ANSWER_CHARS, 2 * len(gold) + 16):
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    if _CONTROL.search(answer):
        return "control character, null byte or lone surrogate"
    if _CODE.search(answer):
        return "Python code, not a mathematical answer"
    depth = deepest = 0
    for char in answer:
        if char == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif char == "}":
            depth -= 1
    if deepest > MAX_BRACE_DEPTH + 2:  # + the \boxed{...} or $...$ wrapper and a \text{}
        return f"braces nested deeper than {MAX_BRACE_DEPTH}"
    digits = max((len(run) for run in _DIGIT_RUN.findall(answer)), default=0)
    if digits > max(MAX_DIGITS, max((len(run) for run in _DIGIT_RUN.findall(gold)), default=0)):
        return f"a number with more than {MAX_DIGITS} digits"
    for exponent, followed_by_power in _exponents(answer):
        if followed_by_power or "^" in exponent or "\\uparrow" in exponent or "!" in exponent:
            return "an exponent tower"
        value = _as_fraction(exponent.replace(" ", "")) if _PLAIN_NUMBER.match(exponent) else None
        if value is not None and abs(value) > MAX_EXPONENT:
            return f"an exponent above {MAX_EXPONENT}"
    if answer.count("^") > 8:
        return "more than 8 exponents"
    product = 1
    for exponent, _ in _exponents(answer):
        value = _as_fraction(exponent.replace(" ", "")) if _PLAIN_NUMBER.match(exponent) else None
        product *= max(1, abs(int(value))) if value is not None else 1
    if product > MAX_EXPONENT_PRODUCT:
        return f"powers of powers above {MAX_EXPONENT_PRODUCT}"
    for m in _SCIENTIFIC.finditer(answer):
        if abs(int(m.group(1))) > MAX_SCIENTIFIC_EXPONENT:
            return f"a number written with an exponent above e{MAX_SCIENTIFIC_EXPONENT}"
    for m in _BINOMIAL.finditer(answer):
        if any(len(n) > 5 for n in _DIGIT_RUN.findall(m.group(0))):
            return "a binomial coefficient of a number above 99999"
    for m in _FACTORIAL.finditer(answer):
        if int(m.group(1) or m.group(2)) > MAX_FACTORIAL:
            return f"a factorial of a number above {MAX_FACTORIAL}"
    if answer.count("!") > 4 or "\\uparrow" in answer:
        return "factorial or arrow chains"
    if _GROUP_FACTORIAL.search(answer):
        return "a factorial of an expression (e.g. (10!)!)"
    return None


def _exponents(answer: str) -> list[tuple[str, bool]]:
    """(exponent text, whether another `^` follows it directly) for every `^` in `answer`; braced and
    parenthesised exponents are matched with nesting (`10^{10^{10}}` gives `10^{10}`)."""
    found = []
    for m in re.finditer(r"\^", answer):
        i = m.end()
        while i < len(answer) and answer[i] == " ":
            i += 1
        if i < len(answer) and answer[i] in "{(":
            pair = {"{": "}", "(": ")"}[answer[i]]
            depth, j = 0, i
            while j < len(answer):
                depth += 1 if answer[j] == answer[i] else -1 if answer[j] == pair else 0
                if depth == 0:
                    break
                j += 1
            exponent, end = answer[i + 1 : j], j + 1
        else:
            token = _EXPONENT_TOKEN.match(answer, i)
            exponent, end = (token.group(), token.end()) if token else ("", i)
        rest = answer[end:].lstrip(" })")
        found.append((exponent.strip(), rest.startswith("^")))
    return found


def plain_compare(answer: str, gold: str) -> bool | None:
    """Exact comparison when both are plain numbers (`-1,234.5`); None when math-verify must decide.

    Only equality is decided for decimals: math-verify rounds to 6 places, so unequal decimals go to it."""
    body = answer[len(BOXED) : -1] if answer.startswith(BOXED) else answer
    body = body.strip().strip("$").strip()
    if body.startswith("\\text{") and body.endswith("}"):
        body = body[6:-1]
    if not (_PLAIN_NUMBER.match(body) and _PLAIN_NUMBER.match(gold)):
        return None
    a, g = _as_fraction(body.strip()), _as_fraction(gold.strip())
    if a is None or g is None:
        return None
    if a == g:
        return True
    return False if a.denominator == 1 and g.denominator == 1 else None


def gold_reason(gold: str) -> str | None:
    """Why a ground-truth answer cannot be checked against (None: it can): longer than `GOLD_CHARS`, or control
    characters. The data formats refuse such answers when the data loads."""
    if len(gold) > GOLD_CHARS or _CONTROL.search(gold):
        return f"ground truth {gold[:60]!r}... is not a usable answer"
    return None


def or_reason(answers: list[str], gold: str) -> str | None:
    """Why `answers` score 0 for being joined by "or" (None: they are not, or the gold is too)."""
    if not _OR.search(gold) and any(_OR.search(a) for a in answers):
        return "answers joined by 'or'"
    return None


def _body(answer: str) -> tuple[str, tuple[str, str]]:
    """(the maths inside an answer of `final_answers`, the wrapper around it)."""
    if answer.startswith(BOXED) and answer.endswith("}"):
        return answer[len(BOXED) : -1], (BOXED, "}")
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        return answer[1:-1], ("$", "$")
    return answer, ("$", "$")


def single_values(answers: list[str], gold: str) -> tuple[list[str], str | None]:
    """(the answers to check, each naming one value, or a reason for scoring 0) when `gold` names one value;
    `answers` unchanged when the gold names several (see the module docstring). Every answer comes back
    wrapped (`\\boxed{}` or `$...$`), so that math-verify reads it as maths and never salvages a number
    out of text it cannot parse."""
    if names_several_values(gold):
        return [answer if answer.startswith((BOXED, "$")) else f"${answer}$" for answer in answers], None
    out: list[str] = []
    for answer in answers:
        body, wrapper = _body(answer)
        values, nested = answer_values(body)
        if nested:
            return [], "several values inside brackets or text"
        # a full stop closing the sentence is no part of the value (`\\boxed{42.}`)
        out.extend(wrapper[0] + (value.rstrip(" .") or value) + wrapper[1] for value in (values if len(values) > 1 else [body]))
    out = list(dict.fromkeys(out))
    if len(out) > MAX_BOXED:
        return [], f"more than {MAX_BOXED} values"
    return out, None
