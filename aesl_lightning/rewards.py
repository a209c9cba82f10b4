"""Reward functions with TRL's signature, and the answer checking they share with evaluation.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`: `completions[i]` is the
text of completion i (or a conversational list of messages), and every other column of the dataset
(`answer`, ...) arrives as a keyword argument holding one value per completion. `None` means "no reward
for this completion" (TRL's convention). A user's TRL reward function therefore works unchanged.

Model output is only parsed (math-verify parses LaTeX into sympy); it is never executed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("aesl_lightning")

BOXED = "\\boxed{"
# Whole-string check of the built-in format: some reasoning, then the answer in \boxed{...} at the end.
_TRAILING_BOXED = re.compile(r"\\boxed\{[^{}]*(\{[^{}]*\}[^{}]*)*\}\s*\.?\s*$")


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as TRL conversational messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, with nested braces matched; None if there is none
    (or the last one is never closed)."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def answers_match(completion: str, answer: str, timeout_seconds: int = 5) -> bool:
    """Whether the final answer of `completion` equals `answer`, symbolically (math-verify).

    The completion's answer is its last `\\boxed{}` when it has one (otherwise math-verify looks for the
    last expression). `answer` is a ground-truth string such as "47", "1/2" or "\\frac{1}{2}". Parsing and
    comparison are each bounded by `timeout_seconds`, so a pathological completion cannot hang training;
    a timeout or parse failure counts as wrong.
    """
    from math_verify import parse, verify

    try:
        gold = parse(f"${answer}$", parsing_timeout=timeout_seconds)
        boxed = extract_boxed(completion)
        pred = parse(f"\\boxed{{{boxed}}}" if boxed is not None else completion, parsing_timeout=timeout_seconds)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout_seconds))
    except Exception as err:  # math-verify raises on timeouts and exotic inputs; neither may stop training
        log.debug("answer check failed (%s: %s); counted as wrong", type(err).__name__, err)
        return False


def math_accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion's final answer is symbolically equal to the `answer` column, else 0.0.

    `None` for a row whose ground truth is missing, so that it is left out rather than scored as wrong.
    """
    if len(answer) != len(completions):
        raise ValueError(f"math_accuracy: {len(completions)} completions but {len(answer)} answers")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if gold is None or str(gold).strip() == "":
            rewards.append(None)
        else:
            rewards.append(1.0 if answers_match(completion_text(completion), str(gold)) else 0.0)
    return rewards


def boxed_format(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion ends with its answer in `\\boxed{...}` (a trailing period allowed), else 0.0."""
    return [1.0 if _TRAILING_BOXED.search(completion_text(c)) else 0.0 for c in completions]
