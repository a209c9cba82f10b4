"""The reproduction pipeline (experiments/reproduce.py over experiments/reproduction/): its configuration, its
choices and statistics on known cases, the committed reports rebuilt from the committed unit records, and smoke runs
end to end."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"

# experiments/ on sys.path (the spawned worker processes inherit it) so that `reproduce` and `reproduction` import by name
sys.path.insert(0, str(REPO / "experiments"))
import reproduce as R  # noqa: E402
from aesl_lightning.study.report import read_json  # noqa: E402
from aesl_lightning.study.units import UnitStore  # noqa: E402
from reproduction import ablation, analysis, config, report, study  # noqa: E402

TRACKS, ESTIMATES = config.load_tracks()


def _history(*rows):
    return [{"step": step, "val/answer_accuracy": acc, "val/gen_entropy": ent, "val/self_bleu": 0.5} for step, acc, ent in rows]


def test_the_yaml_tracks_are_the_committed_configurations():
    for name, track in (("cpu", TRACKS["cpu"]), ("gpu-smoke", TRACKS["gpu"].smoke())):
        recorded = read_json(RESULTS / name / "track.json")
        assert json.loads(json.dumps(asdict(track))) == recorded, name
    assert set(ESTIMATES) >= {"cpu", "cpu-smoke", "gpu", "gpu-smoke"}


def test_load_tracks_names_the_field_it_cannot_read(tmp_path):
    text = (REPO / "experiments" / "reproduce.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text.replace("pretrain_lr: 3.0e-3", "pretrain_lr: 3e-3"))
    with pytest.raises(ValueError, match=r"a.yaml: cpu.pretrain_lr: expected float, found '3e-3'"):
        config.load_tracks(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(text.replace("  num_val: 64\n", "  num_val: 64\n  num_vall: 3\n", 1))
    with pytest.raises(ValueError, match=r"track 'cpu'.*unknown fields \['num_vall'\]"):
        config.load_tracks(tmp_path / "b.yaml")


def test_best_accuracy_row_takes_the_first_maximum_after_step_0():
    history = _history((0, 0.9, 0.1), (10, 0.5, 0.1), (20, 0.5, 0.1), (30, 0.3, 0.1))
    assert study.best_accuracy_row(history)["step"] == 10


def test_plan_is_complete_and_acyclic():
    track = TRACKS["cpu"]
    units = study.plan(track)
    ids = [u.id for u in units]
    assert len(ids) == len(set(ids))
    position = {unit_id: i for i, unit_id in enumerate(ids)}
    for unit in units:
        for dep in unit.deps:
            assert dep in position and position[dep] < position[unit.id], (unit.id, dep)
    for seed in track.seeds:
        assert {f"grpo-{arm}-s{seed}" for arm in study.ARMS} <= set(ids)
        assert {f"start_eval-{arm}-s{seed}" for arm in study.ARMS} <= set(ids)
    assert len(track.seeds) >= 3
    # the sweep starts RL from every validation snapshot of the seed-0 CE run, the base model (step 0) included
    sweep = [u for u in units if u.kind == "sweep"]
    assert sweep[0].params["index"] == 0 and len(sweep) == len(range(0, 1 + track.sft_epochs // track.val_every_epochs, track.sweep_every))
    cells = {(u.params["size"], u.params["difficulty"]) for u in ablation.plan(track) if u.kind == "ablation"}
    assert cells == {(n, d) for n in (32, 128, 512) for d in ("easy", "hard")}
    # every committed record is a unit of the plans, and a unit's work folder is where the old runs kept theirs
    planned = {u.id for u in units + ablation.plan(track)}
    assert set(UnitStore(RESULTS / "cpu").records()) <= planned
    assert config.Paths("out", "work").run_dir("sft-aesl-tau0.97-s0") == Path("work/sft/aesl-tau0.97-s0")


def test_aesl_threshold_is_chosen_on_validation_accuracy_then_entropy():
    track = replace(TRACKS["cpu"], aesl_taus=(0.7, 0.9, 0.97))
    finals = {0.7: (0.50, 0.3), 0.9: (0.62, 0.2), 0.97: (0.62, 0.4)}  # tie on accuracy: higher entropy wins
    results = {study.aesl_sweep_id(tau, 0): {"history": _history((0, 0.9, 0.0), (5, acc, ent))} for tau, (acc, ent) in finals.items()}
    tau, rows = study.chosen_tau(track, results)
    assert tau == 0.97 and [r["tau"] for r in rows] == [0.7, 0.9, 0.97]
    results["sft-aesl-s1"] = {"history": []}
    assert study.sft_of(track, results, "aesl", 0) == "sft-aesl-tau0.97-s0"
    assert study.sft_of(track, results, "aesl", 1) == "sft-aesl-s1"


def test_starting_points_of_the_arms():
    track, paths = TRACKS["cpu"], config.Paths(Path("out"), Path("work"))
    ce = {"history": _history((0, 0.4, 0.1), (14, 0.45, 0.3), (28, 0.5, 0.2), (224, 0.4, 0.1)), "turning_point": {"step": 14}}
    results = {"sft-ce-s1": ce}
    assert study.starting_point(track, paths, results, "base", 1) == (str(Path("work/base/hf_model")), None)
    assert study.starting_point(track, paths, results, "ce_best_acc", 1) == (str(Path("work/sft/ce-s1/snapshots/step00028")), ce["history"][2])
    assert study.starting_point(track, paths, results, "ce_turning_point", 1) == (str(Path("work/sft/ce-s1/turning_point/hf_model")), ce["history"][1])
    assert study.starting_point(track, paths, results, "ce_end", 1) == (str(Path("work/sft/ce-s1/final")), ce["history"][3])


def _eval(greedy, pass1, pass8):
    split = {"greedy_accuracy": greedy, "pass@1": pass1, "pass@8": pass8, "gen_entropy": 0.1, "self_bleu": 0.9}
    return {"test": split, "test_hard": split}


def test_summary_of_an_arm_on_a_known_case():
    track = replace(TRACKS["cpu"], seeds=(0, 1, 2))
    results = {}
    for seed, (after, before) in enumerate([(0.2, 0.1), (0.4, 0.2), (0.6, 0.3)]):
        results[f"grpo-dft-s{seed}"] = {"seed": seed, "sft_row": {"step": 224, "val/answer_accuracy": after}, "eval": _eval(after, after, 1.0),
                                        "train": {"first_quarter/frac_reward_zero_std": 0.5}}
        results[f"start_eval-dft-s{seed}"] = {"seed": seed, "eval": _eval(before, before, 1.0)}
    entry = analysis.arm_summary(track, results, "dft")
    mean, half = entry["rl"]["test/pass@1"]["mean_ci"]
    assert mean == pytest.approx(0.4) and half == pytest.approx(4.303 * 0.2 / math.sqrt(3))  # sd 0.2, t(0.975, 2 df)
    assert entry["rl"]["gain/test/pass@1"]["values"] == pytest.approx([0.1, 0.2, 0.3])
    assert entry["sft_step"] == [224, 224, 224] and entry["rl"]["frac_reward_zero_std_first_quarter"]["mean_ci"] == (0.5, 0.0)
    del results["start_eval-dft-s2"]  # a missing start evaluation: no gain columns, never a gain over fewer seeds
    assert "gain/test/pass@1" not in analysis.arm_summary(track, results, "dft")["rl"]
    assert analysis.arm_summary(track, results, "aesl") is None


def test_ablation_difference_is_paired_by_seed():
    track = replace(TRACKS["cpu"], seeds=(0, 1))
    units = [u for u in ablation.plan(track) if u.kind == "ablation" and u.params["size"] == 32 and u.params["difficulty"] == "easy"]
    results = {}
    for u in units:
        p = u.params
        pass1 = {("ce_best_acc", 0): 0.5, ("ce_best_acc", 1): 0.1, ("aesl", 0): 0.6, ("aesl", 1): 0.3}[(p["method"], p["seed"])]
        results[u.id] = {**p, "tau": 0.97 if p["method"] == "aesl" else None, "sft_row": {"step": 10}, "eval": {"pass@1": pass1, "pass@8": 1.0}}
    del results["ablation-aesl-n32-easy-s1"]
    s = analysis.ablation_summary(track, ablation.plan(track), results)
    row = s["table"]["32/easy"]
    assert row["aesl_minus_ce_pass@1"] == (pytest.approx(0.1), 0.0)  # seed 0 only: seed 1 has no AESL partner
    assert row["ce_best_acc"]["seeds"] == [0, 1] and s["taus"] == [0.97] and s["finished"] == 3 and s["planned"] == 24


@pytest.mark.parametrize("name, track_name, smoke, ablation_report", [("cpu", "cpu", False, False), ("cpu", "cpu", False, True),
                                                                      ("gpu-smoke", "gpu", True, False)])
def test_committed_reports_are_rebuilt_from_the_committed_units(name, track_name, smoke, ablation_report):
    """The reports in experiments/results are what the analysis writes from the unit records alone (no training)."""
    track = TRACKS[track_name].smoke() if smoke else TRACKS[track_name]
    out = RESULTS / name
    results = {k: r["result"] for k, r in UnitStore(out).records().items()}
    if ablation_report:
        meta = read_json(out / "ablation_meta.json")
        summary = analysis.ablation_summary(track, ablation.plan(track), results)
        assert json.loads(json.dumps(summary["table"])) == read_json(out / "ablation.json")["table"]
    else:
        meta = read_json(out / "meta.json")
        summary = json.loads(json.dumps(analysis.summarise(track, results)))
        assert summary == read_json(out / "results.json")["summary"]
    if ablation_report:
        assert report.ablation_markdown(track, summary, meta) == (out / "ablation.md").read_text()
    else:
        assert report.results_markdown(track, analysis.summarise(track, results), meta) == (out / "results.md").read_text()


@pytest.mark.distributed
def test_smoke_track_runs_end_to_end_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--track", "cpu", "--smoke", "--out", str(out), "--work", str(work), "--workers", "2"]
    R.main(argv)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary["arms"]) == set(study.ARMS)
    for arm, entry in summary["arms"].items():
        assert len(entry["seeds"]) == 2
        for key in ("test/pass@1", "test/pass@2", "test_hard/greedy_accuracy"):
            assert all(0.0 <= v <= 1.0 for v in entry["rl"][key]["values"]), (arm, key)
    store = UnitStore(out)
    ce = store.load("sft-ce-s0")["result"]
    assert ce["history"][0]["step"] == 0 and ce["history"][0]["val/kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    # the turning-point arm starts from DiversityEarlyStopping's peak, the best-accuracy arm from that snapshot
    tp = store.load("grpo-ce_turning_point-s0")["result"]
    assert tp["start"].endswith("turning_point/hf_model") and tp["sft_row"]["step"] == ce["turning_point"]["step"]
    best = store.load("grpo-ce_best_acc-s0")
    assert best["result"]["sft_row"] == study.best_accuracy_row(ce["history"]) and best["deps"] == ["sft-ce-s0"]
    assert best["machine"]["seconds"] > 0 and best["machine"]["start"]["commit"]
    assert len(summary["sweep"]) == len([u for u in study.plan(TRACKS["cpu"].smoke()) if u.kind == "sweep"])
    for name in ("results.md", "diversity_curve.png", "sweep.png", "meta.json"):
        assert (out / name).is_file(), name
    report_text = (out / "results.md").read_text()
    assert "CE, diversity turning point" in report_text and "Spearman" in report_text
    # a rerun finds every unit finished and only rewrites the report; a lost work folder (a fresh clone of the
    # results) gets its data regenerated to the recorded digests and the base weights back from the results
    weights = (work / "base" / "hf_model" / "model.safetensors").read_bytes()
    assert (out / "base_model" / "model.safetensors").read_bytes() == weights
    test_split = (work / "data" / "test.jsonl").read_bytes()
    shutil.rmtree(work / "data")
    shutil.rmtree(work / "base")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    R.main(argv)
    assert (work / "base" / "hf_model" / "model.safetensors").read_bytes() == weights
    assert (work / "data" / "test.jsonl").read_bytes() == test_split
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()} == before
    assert len(json.loads((out / "meta.json").read_text())["invocations"]) == 2


@pytest.mark.integration
def test_gpu_track_smoke_runs_on_cpu_with_the_real_model(tmp_path):
    """The GPU-sized track's pipeline (SmolLM2-135M-Instruct, no pre-training) for a few steps on CPU."""
    out, work = tmp_path / "out", tmp_path / "work"
    R.main(["--track", "gpu", "--smoke", "--out", str(out), "--work", str(work), "--workers", "2"])
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["base"] is None  # the real model is the base: nothing pre-trained
    assert set(summary["arms"]) == set(study.ARMS)
    grpo = UnitStore(out).load("grpo-aesl-s0")["result"]
    assert grpo["steps"] == 2 and 0.0 <= grpo["eval"]["test_hard"]["pass@1"] <= 1.0
    assert "smollm2" in UnitStore(out).load("grpo-base-s0")["result"]["start"]


@pytest.mark.distributed
def test_ablation_smoke_shares_the_track_folders(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    R.main(["--track", "cpu", "--smoke", "--ablation", "--out", str(out), "--work", str(work), "--workers", "2"])
    table = json.loads((out / "ablation.json").read_text())["table"]
    assert set(table) == {f"{n}/{d}" for n in (8, 16) for d in ("easy", "hard")}
    for cell in table.values():
        for method in ("ce_best_acc", "aesl"):
            mean, _ = cell[method]["pass@1"]
            assert 0.0 <= mean <= 1.0
    store = UnitStore(out)
    cell = store.load("ablation-aesl-n8-hard-s0")["result"]
    assert cell["difficulty"] == "hard" and "pass@2" in cell["eval"]
    coldstart = (work / "ablation" / "aesl-n8-hard-s0" / "data" / "coldstart.jsonl").read_text().splitlines()
    assert len(coldstart) == 8 and all(json.loads(line)["num_steps"] == 3 for line in coldstart)
    assert (out / "ablation.md").is_file() and (out / "ablation.png").is_file()
    assert store.done("base")  # the base model the main table would use, made once
    # AESL uses the threshold the main table chose on its validation split (its sweep ran as a dependency)
    results = {k: r["result"] for k, r in store.records().items()}
    assert cell["tau"] == study.chosen_tau(TRACKS["cpu"].smoke(), results)[0]
    for size_difficulty, row in table.items():
        ce, aesl = row["ce_best_acc"]["pass@1"][0], row["aesl"]["pass@1"][0]
        assert row["aesl_minus_ce_pass@1"][0] == pytest.approx(aesl - ce), size_difficulty  # one seed: the plain difference
    # --report-only runs nothing and reports the finished cells only (an interrupted ablation)
    store.path("ablation-aesl-n8-hard-s0").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    R.main(["--track", "cpu", "--smoke", "--ablation", "--report-only", "--out", str(out), "--work", str(work)])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()} == before
    assert "(7 of 8 planned cells finished)" in (out / "ablation.md").read_text()
    table = json.loads((out / "ablation.json").read_text())["table"]
    assert table["8/hard"]["aesl"]["seeds"] == [] and table["8/easy"]["aesl"]["seeds"] == [0]
    # the main table refuses to report from unfinished units
    with pytest.raises(SystemExit, match="every run finished"):
        R.main(["--track", "cpu", "--smoke", "--report-only", "--out", str(out), "--work", str(work)])
