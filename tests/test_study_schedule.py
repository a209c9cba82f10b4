"""The pool runner: dependencies, records, resume, deadline refusal (and what waits on it), failures, `--until`."""

from datetime import datetime, timezone

import pytest

from aesl_lightning.study.schedule import parse_until, run_units_pool
from aesl_lightning.study.units import Unit, UnitStore

PLANNED = {"base": 60, "sft": 60, "rl": 600}


def _units():
    return [Unit("base", "base"), Unit("sft-s0", "sft", ("base",), {"seed": 0}), Unit("sft-s1", "sft", ("base",), {"seed": 1}),
            Unit("rl-s0", "rl", ("sft-s0",), {"seed": 0})]


def execute(unit, slots):  # module level: the pool's workers import it
    if unit.params.get("fail"):
        raise RuntimeError(f"{unit.id} failed")
    return {"id": unit.id, "slots": slots}


def test_runs_after_dependencies_records_and_resumes(tmp_path):
    store, log = UnitStore(tmp_path), []
    ran = run_units_pool(_units(), store, execute, PLANNED, workers=2, log=log.append)
    assert sorted(ran) == ["base", "rl-s0", "sft-s0", "sft-s1"] and ran[0] == "base" and ran.index("rl-s0") > ran.index("sft-s0")
    base = store.load("base")
    assert base["result"] == {"id": "base", "slots": 2}  # alone (nothing else could run): every worker's share
    assert store.load("sft-s0")["result"]["slots"] == 1 and base["deps"] == [] and store.load("rl-s0")["deps"] == ["sft-s0"]
    assert base["machine"]["seconds"] >= 0 and base["machine"]["start"]["commit"]
    assert run_units_pool(_units(), store, execute, PLANNED, workers=2, log=log.append) == []


def test_deadline_refuses_a_unit_and_skips_what_waits_for_it(tmp_path):
    store, log = UnitStore(tmp_path), []
    ran = run_units_pool(_units(), store, execute, PLANNED, workers=1, deadline=1000.0 + 300, log=log.append, clock=lambda: 1000.0)
    assert sorted(ran) == ["base", "sft-s0", "sft-s1"] and not store.done("rl-s0")
    assert any(line.startswith("[refused] rl-s0") for line in log)
    units = _units() + [Unit("eval-s0", "sft", ("rl-s0",))]
    log.clear()
    assert run_units_pool(units, store, execute, PLANNED, workers=1, deadline=1300.0, log=log.append, clock=lambda: 1000.0) == []
    assert "[skip] eval-s0: waits for rl-s0" in log


def test_a_failure_lets_the_running_units_finish_then_raises(tmp_path):
    store = UnitStore(tmp_path)
    units = [Unit("a", "sft", (), {"fail": True}), Unit("b", "sft"), Unit("c", "rl", ("a", "b"))]
    with pytest.raises(RuntimeError, match="a failed"):
        run_units_pool(units, store, execute, PLANNED, workers=2, log=lambda m: None)
    assert store.done("b") and not store.done("a") and not store.done("c")
    with pytest.raises(ValueError, match="neither listed nor recorded"):
        run_units_pool([Unit("d", "rl", ("zzz",))], store, execute, PLANNED, log=lambda m: None)


def test_parse_until():
    now = datetime(2026, 12, 4, 18, 30, tzinfo=timezone.utc)
    assert parse_until(None) is None
    assert parse_until("20:40", now) == datetime(2026, 12, 4, 20, 40, tzinfo=timezone.utc).timestamp()
    assert parse_until("08:00", now) == datetime(2026, 12, 5, 8, 0, tzinfo=timezone.utc).timestamp()  # past today: tomorrow
    assert parse_until("2026-12-06T01:02", now) == datetime(2026, 12, 6, 1, 2, tzinfo=timezone.utc).timestamp()
    with pytest.raises(SystemExit, match="expected HH:MM"):
        parse_until("soon", now)
