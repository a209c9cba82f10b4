"""Reward functions with TRL's signature, and the answer checking they share with evaluation.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`: `completions[i]` is the
text of completion i (or a conversational list of messages), and every other column of the dataset
(`answer`, ...) arrives as a keyword argument holding one value per completion. `None` means "no reward
for this completion" (TRL's convention). A user's TRL reward function therefore works unchanged.

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

Cheap pre-filters (`prefilter_reason`) reject pathological answers in microseconds: longer than
`MAX_ANSWER_CHARS`, braces nested deeper than `MAX_BRACE_DEPTH`, digit runs longer than `MAX_DIGITS` (or the
gold's), exponent towers, exponents above `MAX_EXPONENT` (or multiplying to more than
`MAX_EXPONENT_PRODUCT`, `(10^{1000})^{9000}`), `1e...` above `MAX_SCIENTIFIC_EXPONENT`, binomials of numbers
above 99999, factorials of numbers above `MAX_FACTORIAL` or of expressions (`(10!)!`),
control characters, null bytes, lone surrogates and Python code (`__`, `import`, `eval`, `;`, ...); completions longer than `MAX_COMPLETION_CHARS` score 0.
Plain numbers are compared in process (exactly, as fractions). Everything else goes to math-verify
(LaTeX into sympy, never executed) in a pool of worker *processes* (`VerifierPool`, started with
`subprocess`, so it works from any thread, from daemonic worker processes and without signals): each
completion gets a hard wall-clock limit (`time_limit`, default 1 s), after which its worker is killed and
replaced and the completion scores 0; completions are checked in parallel across the workers.
math-verify's own signal-based timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`) and its
log messages are cut to `LOG_CHARS` characters.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

log = logging.getLogger("aesl_lightning")

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
LOG_CHARS = 200
DEFAULT_TIME_LIMIT = 1.0

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


def _boxes(text: str) -> tuple[list[tuple[int, int]], int]:
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
    spans, unclosed = _boxes(text)
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
    spans, unclosed = _boxes(text)
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


def _plain_compare(answer: str, gold: str) -> bool | None:
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


# ----------------------------------------------------------------------------------------------------
# math-verify in worker processes


@functools.lru_cache(maxsize=1024)
def _parse_gold(gold: str) -> list:
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=None)


def _verify_in_process(answer: str, gold: str) -> bool:
    """math-verify with its signal timeouts off (the caller bounds the time)."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    pred = parse(answer, parsing_timeout=None)
    if not gold_parsed or not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=None))


class _ShortLog(logging.Filter):
    """Cut math-verify's messages (it logs whole inputs) to LOG_CHARS characters, without tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > LOG_CHARS:
            record.msg, record.args = message[:LOG_CHARS] + f"... [{len(message)} chars]", None
        record.exc_info = record.exc_text = None
        return True


def _quiet_math_verify() -> None:
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ShortLog) for f in logger.filters):
            logger.addFilter(_ShortLog())
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout disabled" notice is ours to give


def _worker_main() -> None:
    """A verifier process: JSON lines `{"id", "answer", "gold"}` on stdin, `{"id", "ok"}` on stdout."""
    _quiet_math_verify()
    import math_verify  # noqa: F401  (the slow import, before saying ready)

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        task = json.loads(line)
        try:
            ok = _verify_in_process(task["answer"], task["gold"])
        except Exception:  # noqa: BLE001 - math-verify and sympy raise on exotic inputs; it is a wrong answer
            ok = False
        out.write(json.dumps({"id": task["id"], "ok": ok}) + "\n")
        out.flush()


_WORKER_COMMAND = (sys.executable, "-c", "from aesl_lightning.rewards import _worker_main; _worker_main()")


class _Worker:
    def __init__(self, command: Sequence[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), text=True, encoding="utf-8",
        )
        self.ready = False
        self.task: int | None = None
        self.deadline = math.inf

    def send(self, task_id: int, answer: str, gold: str, deadline: float) -> None:
        self.process.stdin.write(json.dumps({"id": task_id, "answer": answer, "gold": gold}) + "\n")
        self.process.stdin.flush()
        self.task, self.deadline = task_id, deadline

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class VerifierPool:
    """`workers` math-verify processes; `check(pairs, time_limit)` runs (answer, gold) pairs in parallel, each
    under a hard wall-clock limit: an overrunning worker is killed (SIGKILL) and replaced, its pair is False.

    `command` runs one worker (default: `_worker_main`). Thread-safe (one batch at a time). Workers start lazily, live until `close()` or exit, and exit on their own
    when the parent dies (their stdin closes).
    """

    def __init__(self, workers: int | None = None, startup_timeout: float = 120.0,
                 command: Sequence[str] = _WORKER_COMMAND) -> None:
        workers = workers or int(os.environ.get("AESL_REWARD_WORKERS", "0") or 0)
        self.size = max(1, workers or min(4, os.cpu_count() or 1))
        self.command = tuple(command)  # the worker program (the protocol of `_worker_main`)
        self.startup_timeout = startup_timeout
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.killed = 0

    def start(self) -> None:
        """Start the workers and wait until each has imported math-verify."""
        with self.lock:
            self._fill()
            deadline = time.monotonic() + self.startup_timeout
            while not all(w.ready for w in self.workers):
                self._poll(min(1.0, max(0.0, deadline - time.monotonic())), {})
                if time.monotonic() > deadline:
                    raise RuntimeError(f"math-verify workers did not start within {self.startup_timeout} s")

    def _fill(self) -> None:
        self.workers = [w for w in self.workers if w.process.poll() is None]
        while len(self.workers) < self.size:
            self.workers.append(_Worker(self.command))

    def _poll(self, timeout: float, results: dict[int, bool]) -> None:
        with selectors.DefaultSelector() as selector:
            for worker in self.workers:
                selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
            for key, _ in selector.select(timeout):
                worker = key.data
                line = worker.process.stdout.readline()
                if not line:  # died
                    if worker.task is not None:
                        results[worker.task] = False
                    worker.kill()
                    self.workers.remove(worker)
                    continue
                message = json.loads(line)
                if message.get("ready"):
                    worker.ready = True
                elif message.get("id") == worker.task:
                    results[worker.task] = bool(message["ok"])
                    worker.task, worker.deadline = None, math.inf

    def check(self, pairs: Sequence[tuple[str, str]], time_limit: float = DEFAULT_TIME_LIMIT) -> list[bool]:
        """math-verify's verdict for each (answer, gold); False for any pair that overran `time_limit` s."""
        results: dict[int, bool] = {}
        with self.lock:
            pending = list(range(len(pairs)))[::-1]
            started = time.monotonic()
            while len(results) < len(pairs):
                self._fill()
                now = time.monotonic()
                for worker in self.workers:
                    if worker.ready and worker.task is None and pending:
                        i = pending.pop()
                        worker.send(i, pairs[i][0], pairs[i][1], now + time_limit)
                busy = [w.deadline for w in self.workers if w.task is not None]
                wait = max(0.0, min(busy) - now) if busy else 0.5
                self._poll(min(wait, 0.5), results)
                now = time.monotonic()
                for worker in list(self.workers):
                    if worker.task is not None and now > worker.deadline:
                        log.debug("math-verify overran %.1f s on %r; worker replaced", time_limit,
                                  pairs[worker.task][0][:LOG_CHARS])
                        results[worker.task] = False
                        worker.kill()
                        self.workers.remove(worker)
                        self.killed += 1
                        self._fill()  # the replacement starts importing now, not at the next call
                if now - started > self.startup_timeout + time_limit * len(pairs):
                    raise RuntimeError("math-verify workers stopped answering")
        return [results[i] for i in range(len(pairs))]

    def close(self) -> None:
        with self.lock:
            for worker in self.workers:
                worker.kill()
            self.workers = []


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def verifier_pool(workers: int | None = None) -> VerifierPool:
    """The shared pool (created on first use; `workers` only sets its size then, default `$AESL_REWARD_WORKERS`,
    else min(4, CPUs))."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = VerifierPool(workers)
            atexit.register(_POOL.close)
        return _POOL


# ----------------------------------------------------------------------------------------------------
# Public checks


def _or_reason(answers: list[str], gold: str) -> str | None:
    if not _OR.search(gold) and any(_OR.search(a) for a in answers):
        return "answers joined by 'or'"
    return None


def _plan(completion: str, gold: str) -> tuple[bool | None, list[str]]:
    """(a verdict decided without math-verify, or None and the answers math-verify must all accept)."""
    answers, reason = final_answers(completion)
    reason = reason or _or_reason(answers, gold)
    if reason is None:
        reason = next((r for r in (prefilter_reason(a, gold) for a in answers) if r is not None), None)
    if reason is not None:
        log.debug("answer check: %s; counted as wrong (%r)", reason, completion[-LOG_CHARS:])
        return False, []
    undecided = []
    for answer in answers:
        verdict = _plain_compare(answer, gold)
        if verdict is False:
            return False, []
        if verdict is None:
            undecided.append(answer)
    return (True, []) if not undecided else (None, undecided)


def check_answers(completions: Sequence[str], golds: Sequence[str], time_limit: float = DEFAULT_TIME_LIMIT,
                  pool: VerifierPool | None = None) -> list[bool]:
    """Whether each completion's final answer(s) equal its gold answer (see the module docstring), checked in
    parallel; each completion is bounded by `time_limit` seconds of math-verify time."""
    verdicts: list[bool | None] = []
    jobs: list[tuple[int, str, str]] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        gold = str(gold).strip()
        if len(gold) > 4 * MAX_ANSWER_CHARS or _CONTROL.search(gold):
            raise ValueError(f"answer check: ground truth {gold[:60]!r}... is not a usable answer")
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
    "\\frac{1}{2}"), symbolically; see the module docstring for which answer counts and the limits."""
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
        spans, unclosed = _boxes(text) if len(text) <= MAX_COMPLETION_CHARS else ([], 0)
        tail = text[spans[-1][1] + 1 :].strip() if spans else None
        rewards.append(1.0 if spans and unclosed < 0 and tail in ("", ".") else 0.0)
    return rewards
