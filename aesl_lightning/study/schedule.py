"""Units on a pool of worker processes: `units.run_units`'s contract (resumable, dependencies first, deadline-aware,
one atomic record per finished unit, a machine probe around each), several units at a time; and `--until` times."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timedelta, timezone

from aesl_lightning.study.units import MachineProbe, Unit, UnitStore, estimate


def parse_until(until: str | None, now: datetime | None = None) -> float | None:
    """`HH:MM` (UTC, today or else tomorrow) or an ISO date-time (UTC unless it says otherwise), as seconds since
    the epoch; None stays None."""
    if until is None:
        return None
    now = now or datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(until)
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    except ValueError:
        try:
            hour, minute = (int(x) for x in until.split(":"))
        except ValueError as err:
            raise SystemExit(f"--until: expected HH:MM (UTC) or an ISO date-time, found {until!r}") from err
        when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if when <= now:
            when += timedelta(days=1)
    return when.timestamp()


def _timed(execute: Callable[[Unit, int], dict], unit: Unit, slots: int, repo: str | os.PathLike | None) -> tuple[dict, dict]:
    probe = MachineProbe(repo)
    result = execute(unit, slots)
    return result, probe.finish()


def run_units_pool(units: Sequence[Unit], store: UnitStore, execute: Callable[[Unit, int], dict], planned: Mapping[str, float],
                   workers: int = 1, deadline: float | None = None, log: Callable[[str], None] = print,
                   repo: str | os.PathLike | None = None, clock: Callable[[], float] = time.time) -> list[str]:
    """Run every unit not yet in `store` on `workers` spawned processes, each once its dependencies are recorded,
    in the given order among those ready. Returns the ids run now.

    `execute(unit, slots)` runs in the worker and returns the unit's result; it must be a module-level function.
    `slots` is how many of the pool's workers the unit has to itself: all of them when it is the only unit that can
    run (nothing running, nothing else ready), else 1 (a worker may give a lone unit more threads).

    As in `run_units`: a unit whose estimated end is past `deadline` is not started (nor, then, what depends on
    it); the parent writes each finished unit's record with its machine probe; a unit that raises leaves no record.
    After a failure no unit is started, the running ones finish and are recorded, and the first error is raised.
    Units that run beside each other see each other's load: their records say `busy` and do not set budgets.
    """
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError("run_units_pool: unit ids must be unique")
    if workers < 1:
        raise ValueError(f"run_units_pool: workers must be >= 1, found {workers}")
    known = set(ids)
    for u in units:
        missing = [d for d in u.deps if d not in known and not store.done(d)]
        if missing:
            raise ValueError(f"unit {u.id!r} depends on units neither listed nor recorded: {missing}")
    pending = [u for u in units if not store.done(u.id)]
    given_up: set[str] = set()
    running: dict = {}
    ran: list[str] = []
    errors: list[BaseException] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while running or (pending and not errors):
            changed = False
            if not errors:
                ready = []
                for unit in list(pending):
                    blocked = [d for d in unit.deps if d in given_up]
                    if blocked:
                        log(f"[skip] {unit.id}: waits for {', '.join(blocked)}")
                        pending.remove(unit)
                        given_up.add(unit.id)
                        changed = True
                    elif all(store.done(d) for d in unit.deps):
                        ready.append(unit)
                alone = not running and len(ready) == 1
                records = store.records() if ready else {}
                for unit in ready:
                    if len(running) >= workers:
                        break
                    expected = estimate(unit.kind, records, planned)
                    pending.remove(unit)
                    changed = True
                    if deadline is not None and clock() + expected > deadline:
                        log(f"[refused] {unit.id}: ~{expected / 60:.1f} min would end after the deadline")
                        given_up.add(unit.id)
                        continue
                    log(f"[start] {unit.id} (~{expected / 60:.1f} min)")
                    running[pool.submit(_timed, execute, unit, workers if alone else 1, repo)] = unit
            if not running:
                if changed:
                    continue
                if pending:
                    raise RuntimeError(f"run_units_pool: units with unmet dependencies: {[u.id for u in pending]}")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                try:
                    result, machine = future.result()
                except Exception as err:  # noqa: BLE001  (raised after the running units are recorded)
                    log(f"[failed] {unit.id}: {type(err).__name__}: {err}")
                    errors.append(err)
                    continue
                store.save(unit.id, {"id": unit.id, "kind": unit.kind, "params": dict(unit.params), "deps": list(unit.deps),
                                     "machine": machine, "result": result})
                log(f"[done] {unit.id} in {machine['seconds'] / 60:.1f} min" + (" (busy machine)" if machine["busy"] else ""))
                ran.append(unit.id)
    if errors:
        raise errors[0]
    return ran
