"""math-verify in a pool of worker processes, each check under a hard wall-clock limit.

math-verify (LaTeX into sympy, never executed) runs in worker *processes* (`VerifierPool`, started with
`subprocess`, so it works from any thread, from daemonic worker processes and without signals): each
answer gets a hard wall-clock limit (`time_limit`, default `DEFAULT_TIME_LIMIT` = 1 s), after which its
worker is killed and replaced and the answer counts as wrong; answers are checked in parallel across the
workers. math-verify's own signal-based timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`)
and its log messages are cut to `LOG_CHARS` characters. Answers are parsed as LaTeX only (no number salvaged
from text that does not parse: that is how hedges such as `43 ó 42` used to score 1).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

__all__ = ["DEFAULT_TIME_LIMIT", "LOG_CHARS", "VerifierPool", "verifier_pool"]

log = logging.getLogger("aesl_lightning")

LOG_CHARS = 200
DEFAULT_TIME_LIMIT = 1.0


@functools.lru_cache(maxsize=1024)
def _parse_gold(gold: str) -> list:
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=None)


def _verify_in_process(answer: str, gold: str) -> bool:
    """math-verify with its signal timeouts off (the caller bounds the time). The answer is read as LaTeX only:
    math-verify's default falls back to the last number of text it cannot parse, which scored `43 ó 42` as 42."""
    from math_verify import LatexExtractionConfig, parse, verify

    gold_parsed = _parse_gold(gold)
    pred = parse(answer, extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
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


_WORKER_COMMAND = (sys.executable, "-c", "from aesl_lightning.scoring.verifier import _worker_main; _worker_main()")


# The folder that holds the `aesl_lightning` package: a worker runs there with it first on PYTHONPATH, so it imports
# this very package whether or not it is installed (a checkout run as a script, a stale editable install).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_environment() -> tuple[dict[str, str], str]:
    """(environment, working directory) a worker starts with."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else "")}
    return env, PACKAGE_ROOT


class _Worker:
    def __init__(self, command: Sequence[str]) -> None:
        env, cwd = worker_environment()
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=cwd, text=True, encoding="utf-8",
        )
        self.ready = False
        self.task: int | None = None
        self.deadline = math.inf

    def send(self, task_id: int, answer: str, gold: str, deadline: float) -> None:
        self.process.stdin.write(json.dumps({"id": task_id, "answer": answer, "gold": gold}) + "\n")
        self.process.stdin.flush()
        self.task, self.deadline = task_id, deadline

    def error_tail(self, chars: int = 2000) -> str:
        """The end of what the worker wrote to stderr (why it died)."""
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-chars:].strip()
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr):
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
                    if not worker.ready:  # before it could import math-verify: no replacement would fare better
                        worker.process.wait()
                        why = worker.error_tail()
                        worker.kill()
                        self.workers.remove(worker)
                        raise RuntimeError(f"a math-verify worker exited during start-up (exit code {worker.process.returncode}; "
                                           f"command {list(self.command)!r}, run in {PACKAGE_ROOT}):\n{why or '(no output)'}")
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
