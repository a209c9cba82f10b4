"""The unit runner: deadline refusal, resume at unit granularity, dependencies, and records read back alone."""

import json
import os

import pytest

from aesl_lightning.study.units import Unit, UnitStore, estimate, pending, run_units


def _units():
    return [Unit("base", "base"), Unit("sft-s0", "sft", deps=("base",), params={"seed": 0}),
            Unit("sft-s1", "sft", deps=("base",), params={"seed": 1}), Unit("rl-s0", "rl", deps=("sft-s0",))]


def test_runs_in_order_and_resumes_at_unit_granularity(tmp_path):
    store = UnitStore(tmp_path)
    calls = []

    def execute(unit):
        calls.append(unit.id)
        if unit.id == "sft-s1" and calls.count("sft-s1") == 1:
            raise RuntimeError("killed")
        return {"value": len(unit.id)}

    with pytest.raises(RuntimeError, match="killed"):
        run_units(_units(), store, execute, planned={"base": 1, "sft": 1, "rl": 1}, log=lambda m: None)
    assert calls == ["base", "sft-s0", "sft-s1"]
    assert pending(_units(), store) == ["sft-s1", "rl-s0"]  # the failed unit left no record
    assert not list((tmp_path / "units").glob(".*"))  # and no temporary file
    ran = run_units(_units(), store, execute, planned={"base": 1, "sft": 1, "rl": 1}, log=lambda m: None)
    assert ran == ["sft-s1", "rl-s0"] and calls[3:] == ["sft-s1", "rl-s0"]  # finished units never rerun
    records = UnitStore(tmp_path).records()  # a fresh store reads everything back from the files alone
    assert set(records) == {"base", "sft-s0", "sft-s1", "rl-s0"}
    assert records["sft-s0"]["result"] == {"value": 6} and records["sft-s0"]["params"] == {"seed": 0}
    machine = records["base"]["machine"]
    assert {"start", "end", "seconds", "busy"} <= set(machine) and "commit" in machine["start"] and len(machine["start"]["loadavg"]) == 3


def test_deadline_refuses_a_unit_that_would_end_after_it(tmp_path):
    store = UnitStore(tmp_path)
    now = [1000.0]
    messages = []

    def execute(unit):
        now[0] += {"base": 60, "sft": 600, "rl": 60}[unit.kind]
        return {}

    planned = {"base": 60, "sft": 600, "rl": 60}
    ran = run_units(_units(), store, execute, planned, deadline=1000.0 + 730, log=messages.append, clock=lambda: now[0])
    # base (60 s) fits, sft-s0 (600 s) ends at 1660 <= 1730, sft-s1 would end at 2260: refused; rl-s0 (60 s) ends at 1720: fits
    assert ran == ["base", "sft-s0", "rl-s0"]
    assert any(m.startswith("[refused] sft-s1") for m in messages)


def test_dependencies_wait_and_unknown_ones_are_errors(tmp_path):
    store = UnitStore(tmp_path)
    ran = run_units([Unit("a", "x"), Unit("b", "x", deps=("a",))][::-1], store, lambda u: {}, {"x": 1}, log=lambda m: None)
    assert ran == ["a"]  # b came first and waited
    with pytest.raises(ValueError, match="neither listed nor recorded"):
        run_units([Unit("c", "x", deps=("zzz",))], store, lambda u: {}, {"x": 1})
    assert run_units([Unit("d", "x", deps=("a",))], store, lambda u: {}, {"x": 1}, log=lambda m: None) == ["d"]  # a: recorded
    with pytest.raises(ValueError, match="unique"):
        run_units([Unit("c", "x"), Unit("c", "x")], store, lambda u: {}, {"x": 1})


def test_estimates_use_idle_records_only(tmp_path):
    records = {"a": {"kind": "sft", "machine": {"seconds": 100, "busy": False}},
               "b": {"kind": "sft", "machine": {"seconds": 300, "busy": False}},
               "c": {"kind": "sft", "machine": {"seconds": 9000, "busy": True}}}
    assert estimate("sft", records, {"sft": 5}) == 200
    assert estimate("rl", records, {"rl": 5}) == 5
    with pytest.raises(KeyError, match="no cost estimate"):
        estimate("eval", records, {})


def test_estimates_follow_the_latest_records_not_a_superseded_set():
    def rec(seconds, time):
        return {"kind": "rl", "machine": {"seconds": seconds, "busy": False, "start": {"time": time}}}

    old = {f"old{i}": rec(100, f"2026-12-05 0{i}:00:00 UTC") for i in range(9)}  # a set from another machine
    new = {f"new{i}": rec(200 + i, f"2026-12-06 0{i}:00:00 UTC") for i in range(3)}
    assert estimate("rl", {**old, **new}, {"rl": 5}, recent=3) == 201
    assert estimate("rl", {**old, **new}, {"rl": 5}, recent=4) == pytest.approx(200.5)  # one old record in the window
    assert estimate("rl", {"a": {"kind": "rl", "machine": {"seconds": 7, "busy": False}}}, {"rl": 5}) == 7  # no time


def test_store_refuses_paths_and_names_the_file_of_a_broken_record(tmp_path):
    store = UnitStore(tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        store.path("../x")
    store.save("ok", {"a": 1})
    (tmp_path / "units" / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        store.records()
    assert json.loads((tmp_path / "units" / "ok.json").read_text()) == {"a": 1}


def test_records_are_strict_json(tmp_path):
    store = UnitStore(tmp_path)
    store.save("x", {"a": float("nan"), "b": [float("inf"), 1.5], "c": (1, 2)})
    text = (tmp_path / "units" / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert store.load("x") == {"a": None, "b": [None, 1.5], "c": [1, 2]}


def test_busy_is_the_other_processes_cpu_not_the_load_left_by_this_run(monkeypatch):
    """A unit started right after another unit of the same run sees a load average of ~2 from its own process; only
    the CPU time of other processes during the unit marks it busy."""
    from aesl_lightning.study import units as U

    tick = os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(U.os, "getloadavg", lambda: (2.1, 2.0, 1.9))
    for other_seconds, busy in ((0.0, False), (10.0, False), (60.0, True)):
        machine_jiffies = iter([0, int((100.0 + other_seconds) * tick)])
        own = iter([0.0, 100.0])
        clock = iter([0.0, 100.0])
        monkeypatch.setattr(U, "_busy_jiffies", lambda: next(machine_jiffies))
        monkeypatch.setattr(U, "_own_cpu_seconds", lambda: next(own))
        probe = U.MachineProbe(clock=lambda: next(clock))
        got = probe.finish()
        assert got["busy"] is busy and got["other_cores"] == pytest.approx(other_seconds / 100.0, abs=0.02)
    monkeypatch.setattr(U, "_busy_jiffies", lambda: None)  # nothing measurable: the start's load average decides
    monkeypatch.setattr(U, "_own_cpu_seconds", lambda: 0.0)
    clock = iter([0.0, 100.0])
    assert U.MachineProbe(clock=lambda: next(clock)).finish()["busy"] is True


def test_superseded_records_are_kept_under_a_version_and_the_unit_runs_again(tmp_path):
    store = UnitStore(tmp_path)
    calls = []
    run_units(_units()[:2], store, lambda u: calls.append(u.id) or {"value": len(calls)}, planned={"base": 1, "sft": 1},
              log=lambda m: None)
    first = store.load("sft-s0")
    assert store.supersede("sft-s0", "v1", "cap too short") == "sft-s0-v1"
    kept = store.load("sft-s0-v1")
    assert kept["result"] == first["result"] and kept["renamed_from"] == "sft-s0" and kept["superseded"] == "cap too short"
    assert kept["id"] == "sft-s0-v1" and not store.done("sft-s0")
    run_units(_units()[:2], store, lambda u: calls.append(u.id) or {"value": len(calls)}, planned={"base": 1, "sft": 1},
              log=lambda m: None)
    assert calls == ["base", "sft-s0", "sft-s0"] and store.load("sft-s0")["result"] == {"value": 3}
    with pytest.raises(FileExistsError, match="sft-s0-v1.json exists"):
        store.supersede("sft-s0", "v1", "again")  # evidence is never overwritten
    assert store.load("sft-s0-v1")["result"] == first["result"] and store.done("sft-s0")
    with pytest.raises(ValueError, match="reason"):
        store.supersede("sft-s0", "v2", "")
