"""The study library's report pieces: strict atomic JSON, the meta record of invocations, t-intervals, tables."""

import json
import math

import pytest

from aesl_lightning.study import report as rep


def test_mean_ci_is_the_t_interval_over_seeds():
    mean, half = rep.mean_ci([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert half == pytest.approx(4.303 * 0.2 / math.sqrt(3))  # sd 0.2, t(0.975, 2 df) = 4.303
    assert rep.mean_ci([0.5]) == (0.5, 0.0)
    assert rep.mean_ci([None, 0.3, float("nan")]) == (0.3, 0.0)
    assert all(math.isnan(v) for v in rep.mean_ci([]))
    values = [float(i) for i in range(13)]  # 12 degrees of freedom: past the table, the normal quantile
    assert rep.mean_ci(values)[1] == pytest.approx(1.96 * math.sqrt(sum((v - 6) ** 2 for v in values) / 12) / math.sqrt(13))


def test_format_mean_ci_and_markdown_table():
    assert rep.format_mean_ci(0.12345, 0.01) == "0.123 ± 0.010"
    assert rep.format_mean_ci(0.5, 0.25, digits=2) == "0.50 ± 0.25"
    assert rep.format_mean_ci(float("nan"), float("nan")) == "n/a"
    assert rep.markdown_table(["a", "b"], [[1, "x"], [2, ""]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 |  |"]
    with pytest.raises(ValueError, match="a row of 1 cells under 2 columns"):
        rep.markdown_table(["a", "b"], [[1]])


def test_write_json_is_strict_and_leaves_no_temporary_file(tmp_path):
    path = rep.write_json(tmp_path / "sub" / "x.json", {"b": float("nan"), "a": (1, float("inf"))})
    text = path.read_text()
    assert json.loads(text) == {"a": [1, None], "b": None} and text.index('"a"') < text.index('"b"')
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        rep.read_json(tmp_path / "bad.json")


def test_record_invocation_adds_runs_and_a_report_only_call_keeps_the_producer(tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "machine_summary", lambda: "machine A")
    monkeypatch.setattr(rep, "git_commit", lambda repo=None: "aaa")
    path = tmp_path / "meta.json"
    first = rep.record_invocation(path, "run --x", 120.0, ran=True, settings={"workers": 2}, totals={"run_minutes": 3.0})
    assert first["command"] == "run --x" and first["workers"] == 2 and len(first["invocations"]) == 1
    assert first["invocations"][0]["wall_minutes"] == pytest.approx(2.0)
    monkeypatch.setattr(rep, "machine_summary", lambda: "machine B")
    monkeypatch.setattr(rep, "git_commit", lambda repo=None: "bbb")
    again = rep.record_invocation(path, "run --report-only", 0.6, ran=False, settings={"workers": 1}, totals={"run_minutes": 4.0})
    assert (again["command"], again["commit"], again["machine"], again["workers"]) == ("run --x", "aaa", "machine A", 2)
    assert again["run_minutes"] == 4.0 and again["wall_minutes"] == pytest.approx(0.01) and len(again["invocations"]) == 1
    assert json.loads(path.read_text()) == again
    more = rep.record_invocation(path, "run --y", 60.0, ran=True, settings={"workers": 1})
    assert (more["command"], more["commit"], more["machine"], more["workers"]) == ("run --y", "bbb", "machine B", 1)
    assert [i["wall_minutes"] for i in more["invocations"]] == pytest.approx([2.0, 1.0])


def test_machine_summary_names_cores_python_and_torch():
    text = rep.machine_summary()
    assert "CPU cores" in text and "Python" in text and "torch" in text
