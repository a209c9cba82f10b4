"""Which values a final answer names: the rule that scores a hedge 0 whatever language it is written in.

A hedge joins two values with something that is not arithmetic: a word in any language (`43 ó 42`,
`43 или 42`), a symbol (`43 | 42`, `43 \\mid 42`, `43 \\cup 42`, `43 \\colon 42`), a relation
(`42 \\approx 43`) or a list (`43 \\text{, } 42`). The rule reads the answer's *grammar*, not its words:

- A *valued term* is a number, or a bracket group or command with arguments holding a digit (`(x+1)`,
  `\\frac{1}{2}`, `\\sqrt{2}`, `\\log 8`). Exponents and subscripts belong to the term before them
  (`2^{10}`, `\\log_2 8`), and a group directly after a letter is that function's argument (`f(2)`).
- Two valued terms at the same bracket depth belong to one value when an arithmetic operator stands between
  them (`+` or `-` after a term, `*`, `/`, `\\times`, `\\cdot`, `\\div`, `\\pm`, `\\mp`, `\\bmod`). Otherwise a
  number always starts a new value (no notation multiplies a number written after another term: `43 ó 42`,
  `43 = 42`), and a group or command does when a symbol, a non-arithmetic command or a word (two or more
  letters, or a letter outside Latin and Greek, after a space; anything inside `\\text{}`, brackets too, is
  prose) stands between them (`43 ó \\frac{84}{2}`); juxtaposition alone is a product (`2(x+1)`,
  `2x\\sqrt{3}`, `3\\frac{1}{2}`).
- `,` `;` `&` and `\\\\` outside brackets make a list; inside brackets they separate the items of a tuple,
  set, interval or matrix, which is one value (`(1, 2)`, `\\{2, 3\\}`, `[0, 1)`).

`answer_values(text)` returns the top-level values and whether values are also named inside brackets (or
inside `\\text{}`) without an operator between them. The reward (`aesl_lightning.scoring.rewards`) lets an answer
that names several values score 1 only when every one of them equals the gold (`6 \\times 7 = 42`), or when
the gold itself names several values (`names_several_values`) and math-verify finds the same set.
Linear in the length of the text; nothing is evaluated.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["answer_values", "names_several_values"]

_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi omicron pi varpi "
    "rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi "
    "Psi Omega"
).split()
# Commands that stand for a quantity or a postfix mark: terms, like a letter.
_OPERANDS = frozenset(_GREEK + "infty emptyset varnothing ell hbar imath jmath circ degree prime partial nabla % $".split())
# Binary arithmetic: what joins two terms into one value.
_BINARY = frozenset("cdot times div pm mp ast bmod mod".split())
# Prefix functions: the function and the term after it (its argument) are one term.
_FUNCTIONS = frozenset(
    "log ln lg exp sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh coth sum prod int iint oint lim "
    "max min gcd lcm det sup inf arg Pr frac dfrac tfrac cfrac sqrt binom dbinom tbinom operatorname".split()
)
# Formatting whose content reads as if it stood outside it; letters inside it are words.
_TEXT = frozenset("text textbf textit textrm textsf texttt textnormal mathrm mathbf mathit mathsf mathtt mbox hbox boxed fbox".split())
_IGNORED = frozenset("left right big Big bigg Bigg bigl bigr Bigl Bigr displaystyle textstyle quad qquad".split())
_SPACING = frozenset(", ; : ! > ".split()) | {" "}
_SIGNS = frozenset("+-−±∓")
_BINARY_CHARS = frozenset("*/×÷·⋅∗")
# thousands written 1,000 or, in LaTeX, 1{,}000 are one number
_NUMBER = re.compile(r"\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?(?![\d])|\d+(?:\.\d*)?|\.\d+")
_COMMAND = re.compile(r"\\(?:[A-Za-z]+|.)", re.DOTALL)


@dataclass
class _Level:
    """The reading state at one bracket depth (shared with the text of a `\\text{}` inside it)."""

    depth: int
    prev_end: int | None = None  # end of the last valued term since the last item separator
    operator: bool = False  # an arithmetic operator since that term
    separator: bool = False  # a symbol, word or non-arithmetic command since that term
    after_term: bool = False  # the last token was a term (so a sign after it is a binary operator)
    script: bool = False  # the next term is an exponent or a subscript
    function: int | None = None  # start of a prefix function waiting for its argument
    function_digits: bool = False


@dataclass
class _Frame:
    closers: tuple[str, ...]
    level: _Level
    start: int
    role: str  # "group", "apply" (a function's argument), "arg" (a command's braces), "text"


class _Reader:
    """One left-to-right pass over an answer; see the module docstring for what it records."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.top = _Level(0)
        self.stack: list[_Frame] = []
        self.cuts: list[tuple[int, int]] = []  # (end of a top-level value, start of the next)
        self.nested = False  # values joined without arithmetic inside brackets or \text{}
        self.items = False  # an item separator anywhere
        self.digits = [0]  # digits before each position
        for char in text:
            self.digits.append(self.digits[-1] + char.isdecimal())
        self.brace_close: dict[int, int] = {}
        opened: list[int] = []
        for i, char in enumerate(text):
            escaped = i > 0 and text[i - 1] == "\\"
            if char == "{" and not escaped:
                opened.append(i)
            elif char == "}" and not escaped and opened:
                self.brace_close[opened.pop()] = i
        self.arg_braces: set[int] = set()
        self.text_frames = 0  # open `\text{}` frames
        self.last_bar = max(text.rfind("|"), text.rfind("\\vert"))

    @property
    def level(self) -> _Level:
        return self.stack[-1].level if self.stack else self.top

    def in_text(self) -> bool:
        return self.text_frames > 0

    def term(self, start: int, end: int, valued: bool, number: bool) -> None:
        lv = self.level
        if lv.script:  # an exponent or subscript belongs to the term before it
            lv.script, lv.after_term = False, True
            return
        if lv.function is not None:  # `\log 8`: the function and its argument are one term
            start, valued, number = lv.function, valued or lv.function_digits, False
            lv.function, lv.function_digits = None, False
        if valued:
            if lv.prev_end is not None and not lv.operator and (number or lv.separator):
                if lv.depth == 0 and not self.in_text():
                    self.cuts.append((lv.prev_end, start))
                else:
                    self.nested = True
            lv.prev_end, lv.operator, lv.separator = end, False, False
        lv.after_term = True

    def separator(self) -> None:
        self.level.separator, self.level.after_term = True, False

    def operator(self) -> None:
        self.level.operator, self.level.after_term = True, False

    def item(self, i: int, width: int) -> None:
        if self.in_text():  # prose: `43 \\text{, } 42` joins two values like a word
            self.separator()
            return
        lv = self.level
        self.items = True
        if lv.depth == 0 and not self.in_text():
            self.cuts.append((i, i + width))
        lv.prev_end, lv.operator, lv.separator, lv.after_term = None, False, False, False
        lv.function, lv.script = None, False

    def open(self, i: int, width: int, closers: tuple[str, ...], role: str) -> int:
        if role == "text":
            self.text_frames += 1
            self.stack.append(_Frame(closers, self.level, i, role))
        else:
            self.stack.append(_Frame(closers, _Level(self.level.depth + 1), i, role))
        return i + width

    def close(self, i: int, width: int) -> int:
        frame = self.stack.pop()
        end = i + width
        if frame.role == "text":
            self.text_frames -= 1
            if frame.level.prev_end is not None and frame.level.prev_end > frame.start:
                frame.level.prev_end = end  # a value read inside `\text{...}` ends after its brace
        elif frame.role != "arg":
            valued = self.digits[i] > self.digits[frame.start] and frame.role != "apply"
            self.term(frame.start, end, valued, False)
        return end

    def closes(self, token: str) -> bool:
        return bool(self.stack) and token in self.stack[-1].closers

    def command(self, i: int, name: str, end: int) -> int:
        text, n = self.text, len(self.text)
        k = end
        while k < n and text[k] == " ":
            k += 1
        braced = k < n and text[k] == "{" and k in self.brace_close
        if name in _TEXT and braced:
            return self.open(k, 1, ("}",), "text")
        if name in _FUNCTIONS and not (braced and name != "operatorname"):
            if name == "operatorname" and braced:
                end = self.brace_close[k] + 1
            lv = self.level
            if not lv.script and lv.function is None:
                lv.function, lv.function_digits = i, False
            return end
        if braced or (name == "sqrt" and k < n and text[k] == "["):
            # A command with arguments is one term; its arguments are then read as groups of their own.
            last = k
            if text[last] == "[":  # \sqrt[3]{8}
                self.arg_braces.add(last)
                close = text.find("]", last)
                last = close + 1 if close >= 0 else n
                while last < n and text[last] == " ":
                    last += 1
            while last < n and text[last] == "{" and last in self.brace_close:
                self.arg_braces.add(last)
                last = self.brace_close[last] + 1
            self.term(i, last, self.digits[last] > self.digits[k], False)
            return end
        if name in _BINARY:
            self.operator()
        elif name in _OPERANDS:
            self.term(i, end, False, False)
        else:
            self.separator()  # \mid, \approx, \cup, \colon, \&, \to, \le, ... and unknown commands
        return end

    def bar(self, i: int, width: int) -> int:
        lv = self.level
        if self.closes("|") and lv.after_term:
            return self.close(i, width)
        if self.last_bar >= i + width:
            return self.open(i, width, ("|",), "group")  # an absolute value
        self.separator()
        return i + width

    def read(self) -> None:
        text, n = self.text, len(self.text)
        i = 0
        while i < n:
            char = text[i]
            lv = self.level
            if char.isspace() or char == "~":
                i += 1
            elif char.isdecimal() or (char == "." and i + 1 < n and text[i + 1].isdecimal()):
                m = _NUMBER.match(text, i)
                self.term(i, m.end(), True, True)
                i = m.end()
            elif char.isalpha():
                j = i + 1
                while j < n and (text[j].isalpha() or unicodedata.category(text[j]).startswith("M")):
                    j += 1
                spaced = i == 0 or text[i - 1].isspace() or text[i - 1] == "~"
                if _is_word(text[i:j], spaced, self.in_text()) and not lv.script:
                    self.separator()  # a word joins values, and a sign after it is no subtraction
                else:
                    self.term(i, j, False, False)
                i = j
            elif char == "\\":
                m = _COMMAND.match(text, i)
                name, end = (m.group()[1:], m.end()) if m else ("", i + 1)  # a lone backslash at the end
                if name in _SPACING or name in _IGNORED:
                    i = end
                elif name in ("{", "lbrace"):
                    i = self.open(i, end - i, ("\\}", "\\rbrace"), "group")
                elif name in ("}", "rbrace"):
                    i = self.close(i, end - i) if self.closes(m.group()) else (self.separator() or end)
                elif name == "\\":
                    self.item(i, 2)
                    i = end
                elif name in ("|", "vert", "lvert", "rvert"):
                    i = self.bar(i, end - i)
                else:
                    i = self.command(i, name, end)
            elif char in ",;&":
                self.item(i, 1)
                i += 1
            elif char in "()[]" and self.in_text():
                self.separator()  # brackets in prose: `42 \text{ (or 43)}` names two values
                i += 1
            elif char in "([{":
                if i in self.arg_braces:
                    role = "arg"
                elif char == "(" and i > 0 and text[i - 1].isalpha() and not lv.script:
                    role = "apply"  # f(2): a function's argument
                else:
                    role = "group"
                i = self.open(i, 1, ("}",) if char == "{" else (")", "]"), role)
            elif char in ")]}":
                i = self.close(i, 1) if self.closes(char) else (self.separator() or i + 1)
            elif char == "|":
                i = self.bar(i, 1)
            elif char in _SIGNS:
                if lv.after_term:
                    self.operator()
                i += 1
            elif char in _BINARY_CHARS:
                self.operator()
                i += 1
            elif char in "^_":
                lv.script, lv.after_term = True, False
                i += 1
            elif char in "!'%":
                self.term(i, i + 1, False, False)
                i += 1
            else:
                self.separator()  # =, <, >, :, and every other symbol
                i += 1


def _is_word(run: str, spaced: bool, in_text: bool) -> bool:
    """A word, not a variable: letters inside `\\text{}`, or a spaced run of two or more letters or of a
    letter outside Latin and Greek (single Latin or Greek letters are variables; `2xy` is a product)."""
    if in_text:
        return True
    foreign = any(ord(c) > 127 and "GREEK" not in unicodedata.name(c, "") for c in run if c.isalpha())
    return spaced and (len(run) > 1 or foreign)


def _read(text: str) -> _Reader:
    reader = _Reader(text)
    reader.read()
    return reader


def answer_values(text: str) -> tuple[list[str], bool]:
    """(the values `text` names at its top level, whether it also names several values inside brackets or
    `\\text{}`); see the module docstring for the rule. `text` is the answer without its `\\boxed{}` or `$`."""
    reader = _read(text)
    cuts, nested = reader.cuts, reader.nested
    values, start = [], 0
    for end, next_start in cuts:
        values.append(text[start:end].strip())
        start = next_start
    values.append(text[start:].strip())
    return [value for value in values if value], nested


def names_several_values(text: str) -> bool:
    """Whether `text` names more than one value: a list, values joined without arithmetic (see the module
    docstring), or a tuple, set, interval or matrix (items separated inside brackets)."""
    reader = _read(text)
    return bool(reader.cuts) or reader.nested or reader.items
