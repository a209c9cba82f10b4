"""A study as a list of units: each unit runs once, leaves one small JSON record, and the study resumes.

- `Unit`: an id, a kind (the cost class used for budgeting), the ids it depends on, and its parameters.
- `UnitStore`: one JSON file per finished unit under `<root>/units/<id>.json`, written atomically (a reader sees
  no file or the whole record), so a study killed at any moment resumes at unit granularity and its report is
  rebuilt from these files alone.
- `run_units`: runs the units not yet recorded, in order, once their dependencies are recorded; with a
  deadline it refuses to start a unit whose estimated cost would end past it (estimates from the recorded
  costs of finished units of the same kind, idle runs only, else from the plan's estimates).
- Every record carries the commit and the machine's load at the unit's start and end, and the CPU time other
  processes used while it ran; a unit timed beside other heavy work is marked `busy` and does not set budgets.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

BUSY_CORES = 0.25  # other processes' average CPU use (in cores) above which a unit's timing is not used for budgets


@dataclass(frozen=True)
class Unit:
    id: str
    kind: str
    deps: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)


class UnitStore:
    """Finished units' records, one JSON file each under `<root>/units/`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.dir = Path(root) / "units"

    def path(self, unit_id: str) -> Path:
        if not unit_id or "/" in unit_id or unit_id.startswith("."):
            raise ValueError(f"unit id {unit_id!r} is not a plain file name")
        return self.dir / f"{unit_id}.json"

    def done(self, unit_id: str) -> bool:
        return self.path(unit_id).is_file()

    def load(self, unit_id: str) -> dict:
        path = self.path(unit_id)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a unit record ({err})") from err

    def save(self, unit_id: str, record: Mapping) -> Path:
        path = self.path(unit_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(strict_json(record), f, indent=1, sort_keys=True, allow_nan=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def supersede(self, unit_id: str, version: str, why: str) -> str:
        """Set aside a record that no longer counts: it is kept as `<unit_id>-<version>`, marked with `why` and
        the id it had, and the unit counts as not done (a driver runs it again). Returns the new id. Records are
        evidence: nothing is deleted, and an existing `<unit_id>-<version>` is never overwritten."""
        if not version or not why:
            raise ValueError("supersede: a version label and the reason are both required")
        new_id = f"{unit_id}-{version}"
        if self.done(new_id):
            raise FileExistsError(f"{self.path(new_id)} exists: pick another version label")
        record = self.load(unit_id)
        self.save(new_id, {**record, "id": new_id, "renamed_from": unit_id, "superseded": why})
        self.path(unit_id).unlink()
        return new_id

    def records(self) -> dict[str, dict]:
        """Every recorded unit by id (the report's only input)."""
        if not self.dir.is_dir():
            return {}
        return {p.stem: self.load(p.stem) for p in sorted(self.dir.glob("*.json"))}


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (records are strict JSON), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """`<sha>` of HEAD, with `+dirty` when tracked files differ from it; `unknown` outside a checkout."""
    cwd = str(repo) if repo else None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def cpu_info() -> dict:
    """The CPU's model name and the vector-ISA flags that change which float kernels run (Linux /proc/cpuinfo;
    empty elsewhere). Runs on CPUs with different flags can round differently, so the same seed need not give the
    same weights across machines: records carry this so a reader can tell."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = sorted(x for x in value.split() if x.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def _busy_jiffies() -> int | None:
    """Non-idle CPU time of the whole machine in clock ticks (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class MachineProbe:
    """Load and commit at a unit's start; `finish()` adds the end and the other processes' CPU use."""

    repo: str | os.PathLike | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.start = {"time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC", "loadavg": list(os.getloadavg()),
                      "commit": git_commit(self.repo), "cpu": cpu_info()}
        self._jiffies, self._own, self._wall = _busy_jiffies(), _own_cpu_seconds(), self.clock()

    def finish(self) -> dict:
        wall = self.clock() - self._wall
        end = {"time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC", "loadavg": list(os.getloadavg()), "commit": git_commit(self.repo)}
        jiffies = _busy_jiffies()
        other = None
        if jiffies is not None and self._jiffies is not None:
            machine = (jiffies - self._jiffies) / os.sysconf("SC_CLK_TCK")
            other = max(0.0, machine - (_own_cpu_seconds() - self._own)) / max(wall, 1e-9)
        # Measured CPU use of the other processes decides; the load average at the start only where that cannot be
        # measured (it counts this process's own threads, e.g. the previous unit of the same run, so it would flag
        # back-to-back idle units as busy).
        busy = other > BUSY_CORES if other is not None else self.start["loadavg"][0] > 1.0 + BUSY_CORES
        return {"start": self.start, "end": end, "seconds": wall, "other_cores": other, "busy": busy}


def estimate(kind: str, records: Mapping[str, Mapping], planned: Mapping[str, float], recent: int = 6) -> float:
    """Seconds a unit of `kind` is expected to take: the median of the `recent` latest idle finished units of that
    kind (by their start time: a study's costs change with the machine and the design, and the records of a
    superseded set stay in the store), else the plan's estimate. A kind with neither is an error (the plan must
    budget every kind)."""
    idle = [r["machine"] for r in records.values() if r.get("kind") == kind and not r["machine"].get("busy")]
    idle.sort(key=lambda m: str((m.get("start") or {}).get("time", "")))
    seen = [m["seconds"] for m in idle[-recent:]]
    if seen:
        return float(median(seen))
    if kind not in planned:
        raise KeyError(f"no cost estimate for unit kind {kind!r}: add it to the plan's estimates")
    return float(planned[kind])


def run_units(units: Sequence[Unit], store: UnitStore, execute: Callable[[Unit], dict], planned: Mapping[str, float],
              deadline: float | None = None, log: Callable[[str], None] = print, repo: str | os.PathLike | None = None,
              clock: Callable[[], float] = time.time) -> list[str]:
    """Run every unit not yet in `store`, in the given order, once its dependencies are recorded (a dependency
    may be a unit of this list or one recorded earlier).

    A unit whose estimated end (now + `estimate`) is past `deadline` (seconds since the epoch) is not started:
    the run says so and goes on to later units that fit. A unit that raises leaves no record (it reruns next
    time) and the error propagates after being logged. Returns the ids run now.
    """
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError("run_units: unit ids must be unique")
    known = set(ids)
    for u in units:
        missing = [d for d in u.deps if d not in known and not store.done(d)]
        if missing:
            raise ValueError(f"unit {u.id!r} depends on units neither listed nor recorded: {missing}")
    ran: list[str] = []
    for unit in units:
        if store.done(unit.id):
            continue
        waiting = [d for d in unit.deps if not store.done(d)]
        if waiting:
            log(f"[skip] {unit.id}: waits for {', '.join(waiting)}")
            continue
        expected = estimate(unit.kind, store.records(), planned)
        if deadline is not None and clock() + expected > deadline:
            log(f"[refused] {unit.id}: ~{expected / 60:.1f} min would end after the deadline")
            continue
        log(f"[start] {unit.id} (~{expected / 60:.1f} min)")
        probe = MachineProbe(repo, clock)
        result = execute(unit)
        machine = probe.finish()
        store.save(unit.id, {"id": unit.id, "kind": unit.kind, "params": dict(unit.params), "deps": list(unit.deps), "machine": machine,
                             "result": result})
        log(f"[done] {unit.id} in {machine['seconds'] / 60:.1f} min" + (" (busy machine: timing not used for budgets)" if machine["busy"] else ""))
        ran.append(unit.id)
    return ran


def pending(units: Iterable[Unit], store: UnitStore) -> list[str]:
    return [u.id for u in units if not store.done(u.id)]
