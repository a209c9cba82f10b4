"""experiments/aesl_variants.py on the study library: one unit per loss, resumable, the table rebuilt from the records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import aesl_variants as V  # noqa: E402

from aesl_lightning.study.units import UnitStore  # noqa: E402


def fake_series(acc: float) -> dict:
    return {"val/answer_accuracy": [(16, 0.1), (32, acc)], "val/gen_entropy": [(16, 0.5), (32, 0.25)], "val/self_bleu": [(32, 0.8)],
            "train/learned_share": [(1, 1.0), (2, 0.5)], "train/learned_share_step0": [(0, 0.625)], "train/update_norm": [(1, 0.1), (2, 0.3)]}


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setattr(V, "OUT", tmp_path)
    return tmp_path


def test_runs_each_loss_once_and_the_table_reads_the_records(out, monkeypatch):
    calls = []

    def execute(unit, threads, logs):
        calls.append(unit.id)
        return {"loss": unit.params["loss"], "command": f"-m aesl_lightning {unit.kind}", "series": fake_series(0.5 if unit.id == "ce" else 0.25)}

    monkeypatch.setattr(V, "execute", execute)
    V.main(["--losses", "base", "ce", "--logs", str(out / "logs")])
    V.main(["--losses", "base", "ce", "--logs", str(out / "logs")])  # resumes: nothing reruns
    assert calls == ["base", "ce"]
    store = UnitStore(out)
    record = store.load("ce")
    assert record["kind"] == "fit" and store.load("base")["kind"] == "validate"
    assert record["machine"]["start"]["commit"] and "loadavg" in record["machine"]["end"]  # load and commit at start and end
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| ce |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # answer acc = last value; learned @0 from the step-0 series; learned mean over the steps; update norm mean
    assert cells[1] == "0.500" and cells[9] == "62.5%" and cells[10] == "75.0%" and cells[11] == "50.0%" and cells[12] == "0.200"
    assert cells[5] == "0.800" and cells[2] == "-"  # self-BLEU present, pass@1 never logged
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["loss"] for r in rows] == ["base", "ce"]


def test_a_failed_run_leaves_no_record_and_missing_runs_are_listed(out, monkeypatch):
    def execute(unit, threads, logs):
        raise RuntimeError(f"{unit.id}: exit 1")

    monkeypatch.setattr(V, "execute", execute)
    with pytest.raises(RuntimeError):
        V.main(["--losses", "dft", "--logs", str(out / "logs")])
    assert not UnitStore(out).done("dft")
    V.main(["--losses", "dft", "--report-only"])
    assert "Not run yet: dft." in (out / "results.md").read_text()


def test_runs_under_two_quickstart_versions_are_flagged(out):
    store = UnitStore(out)
    for loss, digest in (("ce", "aaaa"), ("aesl", "bbbb")):
        store.save(loss, {"id": loss, "kind": "fit", "params": {"loss": loss}, "deps": [], "machine": {"seconds": 60.0, "busy": False},
                          "result": {"loss": loss, "command": "x", "quickstart_sha256": digest, "series": fake_series(0.5)}})
    lines = V.write_report(store, ["ce", "aesl"], "python experiments/aesl_variants.py --report-only", 0.0, False)
    text = "\n".join(lines)
    assert "2 versions of experiments/quickstart.yaml (aaaa, bbbb)" in text
    assert "All runs were timed on an idle machine." in text


def test_committed_records_rebuild_the_committed_table(out):
    committed = REPO / "experiments" / "results" / "aesl-variants"
    store = UnitStore(committed)
    lines = V.write_report(store, ["base", *V.LOSSES, *V.RETIRED], "python experiments/aesl_variants.py --report-only", 0.0, False)
    table = [line for line in lines if line.startswith("|")]
    assert table == [line for line in (committed / "results.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + len(V.LOSSES) + len(V.RETIRED)
