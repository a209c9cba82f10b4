"""The benchmark harness (benchmarks/run.py, _records.py, report.py): records carry every required field, their
summaries are the rounds' own statistics, and RESULTS.md is rebuilt from the records alone, current figures first
and the hand-written history after them, marked superseded. The real benchmarks are never run here (too slow):
a tiny fake script stands in for one, and a fabricated record set (a TEST FIXTURE, not measured) feeds the report."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _records  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


def fixture_record(name: str, quick: bool, summary: dict, rounds: list[dict], **extra) -> dict:
    """TEST FIXTURE: a fabricated record in the schema run.py writes. Its numbers are invented for the test and
    were never measured; they only check that the report copies what a record says."""
    record = {"schema": _records.SCHEMA, "name": name, "title": f"Fixture benchmark {name}",
              "script": f"benchmarks/bench_{name}.py", "quick": quick, "commit": "0123456789abcdef" * 2 + "01234567",
              "dirty": False, "started": "2026-12-01T10:00:00+00:00", "finished": "2026-12-01T10:30:00+00:00",
              "command": f"python benchmarks/run.py --only {name}",
              "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0", "lightning": "2.6.6",
                           "trl": None},
              "machine": {"cpu": "Fixture CPU", "cores": 2, "memory_gib": 23.5, "cpu_flags": [], "platform": "Linux"},
              "setting": {"tokens": 4096, "G": 8}, "conditions": ["idle", "loaded"], "rounds": rounds,
              "summary": summary}
    record.update(extra)
    return record


def fixture_round(index: int, condition: str, figures: dict | None, returncode=0) -> dict:
    entry = {"round": index, "condition": condition, "argv": ["python", "benchmarks/bench_x.py", "--steps", "3",
             "--json", "/tmp/out.json"], "load_before": [0.25, 0.3, 0.3], "load_after": [1.5, 0.5, 0.4],
             "seconds": 12.0, "returncode": returncode}
    if figures is None:
        entry["error"] = "Traceback ...\nModuleNotFoundError: No module named 'trl'"
    else:
        entry["result"] = {"setting": {"tokens": 4096}, "summary": figures, "raw": {}}
    return entry


def test_summarise_gives_each_conditions_median_range_and_skips_failed_rounds():
    rounds = [fixture_round(0, "idle", {"ratio": 0.5, "ms": 10.0, "ok": True}),
              fixture_round(0, "loaded", {"ratio": 0.9}),
              fixture_round(1, "loaded", {"ratio": 0.7}),
              fixture_round(1, "idle", {"ratio": 0.7, "ms": 30.0}),
              fixture_round(2, "idle", {"ratio": 0.6, "ms": 20.0}),
              fixture_round(2, "loaded", None, returncode=1)]
    summary = _records.summarise(rounds)
    idle, loaded = summary["idle"], summary["loaded"]
    assert idle["ratio"]["values"] == [0.5, 0.7, 0.6] and idle["ratio"]["median"] == 0.6
    assert (idle["ratio"]["min"], idle["ratio"]["max"], idle["ratio"]["n"]) == (0.5, 0.7, 3)
    assert idle["ms"]["median"] == 20.0 and "ok" not in idle  # booleans are not figures
    assert loaded["ratio"]["values"] == [0.9, 0.7] and loaded["ratio"]["median"] == pytest.approx(0.8)
    assert loaded["ratio"]["ci95"] is None  # two rounds: too few for an interval
    low, high = idle["ms"]["ci95"]
    assert 10.0 <= low <= 20.0 <= high <= 30.0


def test_bootstrap_interval_narrows_with_agreeing_rounds():
    assert _records.bootstrap_median_ci([5.0] * 6) == [5.0, 5.0]
    spread = _records.bootstrap_median_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert spread[0] >= 1.0 and spread[1] <= 100.0 and spread[0] < 3.0 < spread[1]


def test_a_run_writes_a_record_with_every_required_field(tmp_path):
    fake = tmp_path / "bench_fake.py"
    fake.write_text(textwrap.dedent("""
        import json, sys
        out = sys.argv[sys.argv.index("--json") + 1]
        n = int(sys.argv[sys.argv.index("--n") + 1])
        json.dump({"setting": {"n": n}, "summary": {"twice_n": 2.0 * n}, "raw": {"n": n}}, open(out, "w"))
    """))
    bench = run.Benchmark("fake", "Fake benchmark", str(fake), ("--n", "5"), ("--n", "2"))
    run.BY_NAME["fake"] = bench
    try:
        opts = type("Opts", (), {"quick": True, "conditions": ["idle"], "rounds": 3, "timeout": 60,
                                 "records": tmp_path / "records"})()
        run.run_benchmark(bench, opts, "python benchmarks/run.py --quick --only fake")
    finally:
        del run.BY_NAME["fake"]
    record = json.loads((tmp_path / "records" / "fake.json").read_text())
    assert _records.missing_fields(record) == []
    assert record["quick"] is True and record["setting"] == {"n": 2}
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]) and isinstance(record["dirty"], bool)
    assert set(record["versions"]) == {"python", "torch", "transformers", "lightning", "trl"}
    assert record["machine"]["cores"] >= 1
    assert [r["condition"] for r in record["rounds"]] == ["idle"] * 3
    assert all(len(r["load_before"]) == 3 and r["returncode"] == 0 for r in record["rounds"])
    assert record["summary"]["idle"]["twice_n"]["values"] == [4.0, 4.0, 4.0]
    assert record["rounds"][0]["argv"][-2] == "--json"


def test_missing_fields_names_what_a_record_lacks():
    record = fixture_record("x", False, {}, [fixture_round(0, "idle", {"a": 1.0})])
    del record["commit"]
    del record["rounds"][0]["load_after"]
    del record["rounds"][0]["result"]
    assert _records.missing_fields(record) == ["commit", "rounds[0].load_after", "rounds[0].result or error"]


def write_fixture_set(directory: Path) -> None:
    """TEST FIXTURE records (fabricated numbers): one full record with both conditions, one quick record
    whose only loaded round failed."""
    directory.mkdir()
    full_rounds = [fixture_round(0, "idle", {"time_ratio": 0.61}), fixture_round(0, "loaded", {"time_ratio": 0.83}),
                   fixture_round(1, "loaded", {"time_ratio": 0.79}), fixture_round(1, "idle", {"time_ratio": 0.59}),
                   fixture_round(2, "idle", {"time_ratio": 0.63})]
    full = fixture_record("losses", False, _records.summarise(full_rounds), full_rounds)
    quick_rounds = [fixture_round(0, "idle", {"speedup": 97.0}), fixture_round(0, "loaded", None, returncode=1)]
    quick = fixture_record("self_bleu", True, _records.summarise(quick_rounds), quick_rounds, dirty=True)
    for record in (quick, full):
        (directory / f"{record['name']}.json").write_text(json.dumps(record))


def test_report_is_built_from_the_records_current_first_history_last(tmp_path):
    write_fixture_set(tmp_path / "records")
    history = tmp_path / "history.md"
    history.write_text("# Old results\n\n## GRPO step (2026-11-25)\n\n| ratio | 0.508 |\n")
    results = tmp_path / "RESULTS.md"
    report.write_report(tmp_path / "records", results, history)
    text = results.read_text()
    current, _, past = text.partition("## Superseded / history")
    assert past, "the history section is missing"
    # current figures: both records, in run.py's order (losses before self_bleu), with their provenance
    assert current.index("Fixture benchmark losses") < current.index("Fixture benchmark self_bleu")
    assert "`python benchmarks/run.py --only losses`" in current and "Commit `0123456789ab`" in current
    assert "2026-12-01T10:00:00+00:00" in current and "tokens 4096; G 8" in current
    assert "python benchmarks/bench_x.py --steps 3`" in current and "/tmp/out.json" not in current
    row = next(line for line in current.splitlines() if line.startswith("| time_ratio |"))
    cells = row.split(" | ")
    assert cells[1:3] == ["0.61", "0.59-0.63"] and cells[4] == "3"  # idle: median, range over rounds, n
    low, high = map(float, cells[3].split("-"))
    assert 0.59 <= low <= 0.61 <= high <= 0.63  # idle: bootstrap interval of the median
    assert row.split(" | ")[5:9:3] == ["0.81", "2 |"]  # loaded: median of 0.83 and 0.79 over 2 rounds
    assert "QUICK" in current.split("Fixture benchmark self_bleu")[1].splitlines()[0]
    assert "QUICK" not in current.split("Fixture benchmark losses")[1].splitlines()[0]
    assert "with uncommitted changes" in current.split("Fixture benchmark self_bleu")[1]
    assert "FAILED: exit 1" in current and "No module named 'trl'" in current
    assert "0.508" not in current  # no history figure is quoted as current
    # history: verbatim, marked superseded, headings nested under the history heading
    assert "none of them is a current figure" in past
    assert "\n### Old results\n" in past and "\n#### GRPO step (2026-11-25)\n" in past and "| ratio | 0.508 |" in past


def test_report_without_records_says_no_figure_is_current(tmp_path):
    results = tmp_path / "RESULTS.md"
    history = tmp_path / "history.md"
    history.write_text("# Old\n\n| aesl / ce | 0.47 |\n")
    report.write_report(tmp_path / "no-records", results, history)
    current, _, past = results.read_text().partition("## Superseded / history")
    assert "no figure is current" in current and "### " not in current and "0.47" not in current
    assert "| aesl / ce | 0.47 |" in past


def test_report_refuses_a_record_without_required_fields(tmp_path):
    (tmp_path / "records").mkdir()
    record = fixture_record("losses", False, {}, [])
    del record["machine"]
    (tmp_path / "records" / "losses.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"losses\.json.*machine"):
        report.write_report(tmp_path / "records", tmp_path / "RESULTS.md", tmp_path / "none.md")


def test_every_registered_benchmark_script_exists_and_takes_json():
    here = Path(run.__file__).parent
    shared = (here / "bench_grpo_memory.py").read_text()
    helper = shared[shared.index("def add_step_options("):shared.index("def main(")]
    assert '"--json"' in helper  # the GRPO step options shared by bench_grpo_memory and bench_grpo_precision
    for bench in run.BENCHMARKS:
        source = (here / bench.script).read_text()
        assert '"--json"' in source or "add_step_options(parser" in source, f"{bench.script} has no --json option"
    assert len({b.name for b in run.BENCHMARKS}) == len(run.BENCHMARKS)


def test_dirty_flag_ignores_the_records_and_report_but_not_code(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "records").mkdir(parents=True)
    for name in ("benchmarks/records/x.json", "benchmarks/RESULTS.md", "code.py"):
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "fixture")
    commit, dirty = _records.git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and dirty is False
    (tmp_path / "benchmarks/records/x.json").write_text("1\n")
    (tmp_path / "benchmarks/RESULTS.md").write_text("1\n")
    assert _records.git_state(tmp_path) == (commit, False)
    (tmp_path / "code.py").write_text("1\n")
    assert _records.git_state(tmp_path) == (commit, True)


def test_grpo_precision_summary_on_hand_made_runs():
    import bench_grpo_precision as bench

    def side(steps, tokens, peak):
        return {"steps": steps, "tokens": tokens, "training_peak_mib": peak, "process_peak_mib": peak + 100}

    # first step of each run dropped; fp32: steps 10, 12 over 100, 120 tokens; bf16-mixed: 5, 6 over 100, 100 tokens
    runs = {"32-true": [side([99, 10], [1, 100], 900), side([99, 12], [1, 120], 1000)],
            "bf16-mixed": [side([99, 5], [1, 100], 700), side([99, 6], [1, 100], 800)]}
    s = bench.summarise(runs, drop_first=1)
    assert s["fp32_step_s"] == 11 and s["bf16_mixed_step_s"] == 5.5 and s["bf16_mixed_step_speedup"] == 2
    assert s["fp32_s_per_token"] == 0.1 and s["bf16_mixed_s_per_token"] == 0.055
    assert s["bf16_mixed_per_token_speedup"] == pytest.approx(0.1 / 0.055)
    assert s["fp32_training_peak_mib"] == 1000 and s["bf16_mixed_training_peak_ratio"] == 0.8  # the largest over rounds
    assert s["bf16_mixed_process_peak_mib"] == 900 and s["fp32_tokens_per_step"] == 110


def _opts(tmp_path, **kw):
    base = {"quick": False, "conditions": ["idle", "loaded"], "rounds": None, "resume": False, "records": tmp_path}
    return type("Opts", (), {**base, **kw})()


def _timed_round(index, condition, seconds, argv, ok=True):
    entry = fixture_round(index, condition, {"ratio": 1.0} if ok else None, returncode=0 if ok else 1)
    entry.update(seconds=seconds, argv=argv)
    return entry


def test_expected_time_is_the_records_median_per_condition_else_the_plan(tmp_path):
    bench = run.BY_NAME["grpo_memory_lora"]  # planned 10 min idle, 2 full rounds
    opts = _opts(tmp_path)
    assert run.expected_seconds(bench, opts, None) == pytest.approx(2 * (600 + 600 * run.LOADED_SLOWDOWN))
    argv = ["python", "benchmarks/bench_grpo_memory.py", "--mode", "lora", "--steps", "3", "--json", "/tmp/x.json"]
    rounds = [_timed_round(0, "idle", 100.0, argv), _timed_round(0, "loaded", 300.0, argv), _timed_round(1, "loaded", 200.0, argv),
              _timed_round(1, "idle", 120.0, argv), _timed_round(2, "idle", 5.0, argv, ok=False)]  # a failed round does not count
    record = fixture_record("grpo_memory_lora", False, {}, rounds)
    assert run.expected_seconds(bench, opts, record) == pytest.approx(2 * (110.0 + 250.0))
    assert run.expected_seconds(bench, _opts(tmp_path, conditions=["idle"]), record) == pytest.approx(2 * 110.0)
    only_idle = fixture_record("grpo_memory_lora", False, {}, rounds[:1])  # loaded not measured: idle x the planned slowdown
    assert run.expected_seconds(bench, opts, only_idle) == pytest.approx(2 * (100.0 + 100.0 * run.LOADED_SLOWDOWN))
    quick = fixture_record("grpo_memory_lora", True, {}, rounds)  # another size says nothing about this one
    assert run.expected_seconds(bench, opts, quick) == run.expected_seconds(bench, opts, None)


def test_resume_skips_only_a_complete_record_of_the_same_run(tmp_path):
    bench = run.BY_NAME["self_bleu"]  # full: no arguments, 3 rounds
    opts = _opts(tmp_path)
    argv = [run.shlex.quote(a) for a in run.script_argv(bench, False, "/tmp/a/result.json")]
    full = [_timed_round(r, c, 60.0, argv) for r in range(3) for c in ("idle", "loaded")]
    assert run.is_complete(bench, opts, fixture_record("self_bleu", False, {}, full, conditions=["idle", "loaded"]))
    assert not run.is_complete(bench, opts, None)
    assert not run.is_complete(bench, opts, fixture_record("self_bleu", False, {}, full[:5], conditions=["idle", "loaded"]))
    assert not run.is_complete(bench, opts, fixture_record("self_bleu", True, {}, full, conditions=["idle", "loaded"]))
    other = [dict(r, argv=r["argv"][:2] + ["--prompts", "16"] + r["argv"][2:]) for r in full]  # other arguments
    assert not run.is_complete(bench, opts, fixture_record("self_bleu", False, {}, other, conditions=["idle", "loaded"]))
    failed = full[:5] + [_timed_round(2, "loaded", 60.0, argv, ok=False)]
    assert not run.is_complete(bench, opts, fixture_record("self_bleu", False, {}, failed, conditions=["idle", "loaded"]))
    assert run.is_complete(bench, _opts(tmp_path, conditions=["idle"]),
                           fixture_record("self_bleu", False, {}, [r for r in full if r["condition"] == "idle"], conditions=["idle"]))


def test_a_deadline_leaves_what_does_not_fit_and_keeps_shorter_ones_after_it(tmp_path):
    opts = _opts(tmp_path, conditions=["idle"])
    said = []
    # planned idle minutes x full rounds: losses 3 x 3 = 9, grpo_memory_lora 10 x 2 = 20, self_bleu 1 x 3 = 3
    names = ["losses", "grpo_memory_lora", "self_bleu"]
    assert run.schedule(names, opts, now=0.0, deadline=15 * 60, log=said.append) == ["losses", "self_bleu"]
    assert len(said) == 1 and said[0].startswith("[grpo_memory_lora] left for a later sitting: expected 20 min")
    assert run.schedule(names, opts, now=0.0, deadline=None, log=said.append) == names
    argv = [run.shlex.quote(a) for a in run.script_argv(run.BY_NAME["losses"], False, "/x")]
    done = fixture_record("losses", False, {}, [_timed_round(r, "idle", 60.0, argv) for r in range(3)], conditions=["idle"])
    (tmp_path / "losses.json").write_text(json.dumps(done))
    resumed = _opts(tmp_path, conditions=["idle"], resume=True)
    assert run.schedule(names, resumed, now=0.0, deadline=15 * 60, log=said.append) == ["self_bleu"]  # 20 min still does not fit
    assert "already recorded" in said[-2] and "skipped (--resume)" in said[-2]
