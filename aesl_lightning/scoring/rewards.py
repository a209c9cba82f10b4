"""Reward functions with TRL's signature, and the answer checking they share with evaluation.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`: `completions[i]` is the
text of completion i (or a conversational list of messages), and every other column of the dataset
(`answer`, ...) arrives as a keyword argument holding one value per completion. `None` means "no reward
for this completion" (TRL's convention). A user's TRL reward function therefore works unchanged.

`check_answers` decides what it can in process (`aesl_lightning.scoring.answers`: which answer counts, cheap
pre-filters, exact comparison of plain numbers) and sends the rest to math-verify under a time limit
(`aesl_lightning.scoring.verifier`); a completion longer than `MAX_COMPLETION_CHARS` scores 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aesl_lightning.scoring.answers import (
    MAX_ANSWER_CHARS,
    MAX_COMPLETION_CHARS,
    boxed_spans,
    completion_text,
    extract_boxed,
    final_answers,
    gold_reason,
    or_reason,
    plain_compare,
    prefilter_reason,
    single_values,
)
from aesl_lightning.scoring.verifier import DEFAULT_TIME_LIMIT, LOG_CHARS, VerifierPool, verifier_pool

__all__ = [
    "DEFAULT_TIME_LIMIT",
    "MAX_ANSWER_CHARS",
    "MAX_COMPLETION_CHARS",
    "VerifierPool",
    "answers_match",
    "boxed_format",
    "check_answers",
    "completion_text",
    "extract_boxed",
    "final_answers",
    "math_accuracy",
    "prefilter_reason",
    "verifier_pool",
]

log = logging.getLogger("aesl_lightning")


def _plan(completion: str, gold: str) -> tuple[bool | None, list[str]]:
    """(a verdict decided without math-verify, or None and the answers math-verify must all accept)."""
    answers, reason = final_answers(completion)
    reason = reason or or_reason(answers, gold)
    if reason is None:
        reason = next((r for r in (prefilter_reason(a, gold) for a in answers) if r is not None), None)
    if reason is None:
        answers, reason = single_values(answers, gold)
    if reason is not None:
        log.debug("answer check: %s; counted as wrong (%r)", reason, completion[-LOG_CHARS:])
        return False, []
    undecided = []
    for answer in answers:
        verdict = plain_compare(answer, gold)
        if verdict is False:
            return False, []
        if verdict is None:
            undecided.append(answer)
    return (True, []) if not undecided else (None, undecided)


def check_answers(completions: Sequence[str], golds: Sequence[str], time_limit: float = DEFAULT_TIME_LIMIT,
                  pool: VerifierPool | None = None) -> list[bool]:
    """Whether each completion's final answer(s) equal its gold answer (see `aesl_lightning.scoring.answers`), checked in
    parallel; each completion is bounded by `time_limit` seconds of math-verify time."""
    verdicts: list[bool | None] = []
    jobs: list[tuple[int, str, str]] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        gold = str(gold).strip()
        reason = gold_reason(gold)
        if reason is not None:
            raise ValueError(f"answer check: {reason}")
        verdict, answers = _plan(completion, gold)
        verdicts.append(verdict)
        jobs.extend((i, answer, gold) for answer in answers)
    if jobs:
        pool = pool or verifier_pool()
        # a completion with several boxed answers shares its limit between them
        counts: dict[int, int] = {}
        for i, _, _ in jobs:
            counts[i] = counts.get(i, 0) + 1
        results = pool.check([(answer, gold) for _, answer, gold in jobs], time_limit / max(counts.values()))
        for i in counts:
            verdicts[i] = all(ok for (j, _, _), ok in zip(jobs, results) if j == i)
    return [bool(v) for v in verdicts]


def answers_match(completion: str, answer: str, time_limit: float = DEFAULT_TIME_LIMIT) -> bool:
    """Whether the final answer of `completion` equals `answer` (a ground truth such as "47", "1/2" or
    "\\frac{1}{2}"), symbolically; `aesl_lightning.scoring.answers` says which answer counts and the limits."""
    return check_answers([completion], [answer], time_limit)[0]


def math_accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion's final answer is symbolically equal to the `answer` column, else 0.0.

    `None` for a row whose ground truth is missing, so that it is left out rather than scored as wrong.
    Completions are checked in parallel (`check_answers`); safe to call from any thread or process.
    """
    if len(answer) != len(completions):
        raise ValueError(f"math_accuracy: {len(completions)} completions but {len(answer)} answers")
    rows = [i for i, gold in enumerate(answer) if gold is not None and str(gold).strip() != ""]
    texts = [completion_text(completions[i]) for i in rows]
    ok = check_answers(texts, [str(answer[i]) for i in rows]) if rows else []
    rewards: list[float | None] = [None] * len(completions)
    for i, verdict in zip(rows, ok):
        rewards[i] = 1.0 if verdict else 0.0
    return rewards


def boxed_format(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion ends with its answer in `\\boxed{...}` (a trailing period allowed) and opens no
    box it does not close, else 0.0. Linear time in the completion's length."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        spans, unclosed = boxed_spans(text) if len(text) <= MAX_COMPLETION_CHARS else ([], 0)
        tail = text[spans[-1][1] + 1 :].strip() if spans else None
        rewards.append(1.0 if spans and unclosed < 0 and tail in ("", ".") else 0.0)
    return rewards
