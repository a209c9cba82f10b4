"""The reproduction pipeline (experiments/reproduce.py): its statistics, its choices and a smoke run end to end."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# experiments/ on sys.path (the spawned worker processes inherit it) so that `reproduce` imports by name
sys.path.insert(0, str(REPO / "experiments"))
import reproduce as R


def _spearman_reference(x, y):
    # Pearson correlation of average ranks, ranks by counting (O(n^2), obvious)
    def ranks(v):
        return [sum(1 for b in v if b < a) + (sum(1 for b in v if b == a) - 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_matches_reference_with_ties():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(3, 12)
        x = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)]
        y = [rng.random() for _ in range(n)]
        if len(set(x)) == 1:
            assert math.isnan(R.spearman(x, y))
            continue
        assert R.spearman(x, y) == pytest.approx(_spearman_reference(x, y), abs=1e-12)
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_mean_ci_is_the_t_interval():
    mean, half = R.mean_ci([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert half == pytest.approx(4.303 * 0.2 / math.sqrt(3))  # sd 0.2, t(0.975, 2 df) = 4.303
    assert R.mean_ci([0.5]) == (0.5, 0.0)
    assert R.mean_ci([None, 0.3, float("nan")]) == (0.3, 0.0)
    assert all(math.isnan(v) for v in R.mean_ci([]))


def test_best_accuracy_row_takes_the_first_maximum():
    history = [{"step": 0, "val/answer_accuracy": 0.9}, {"step": 10, "val/answer_accuracy": 0.5},
               {"step": 20, "val/answer_accuracy": 0.5}, {"step": 30, "val/answer_accuracy": 0.3}]
    assert R.best_accuracy_row(history)["step"] == 10


def test_plan_is_complete_and_acyclic():
    track = R.TRACKS["cpu"]
    runs = R.plan(track, R.Paths(Path("out"), Path("work")))
    ids = [r.id for r in runs]
    assert len(ids) == len(set(ids))
    position = {run_id: i for i, run_id in enumerate(ids)}
    for run in runs:
        for dep in run.deps:
            assert dep in position and position[dep] < position[run.id], (run.id, dep)
    for seed in track.seeds:
        assert {f"grpo/{arm}-s{seed}" for arm in R.ARMS} <= set(ids)
    assert len(track.seeds) >= 3
    # the sweep starts RL from every validation snapshot of the seed-0 CE run, the base model (step 0) included
    sweep = [r for r in runs if r.kind == "sweep"]
    assert sweep[0].params["index"] == 0 and len(sweep) == len(range(0, 1 + track.sft_epochs // track.val_every_epochs, track.sweep_every))
    ablation = R.plan(track, R.Paths(Path("out"), Path("work")), ablation=True)
    cells = {(r.params["size"], r.params["difficulty"]) for r in ablation if r.kind == "ablation"}
    assert cells == {(n, d) for n in (32, 128, 512) for d in ("easy", "hard")}


def test_aesl_threshold_is_chosen_on_validation_accuracy(tmp_path):
    track = R.replace(R.TRACKS["cpu"], aesl_taus=(0.7, 0.9, 0.97))
    paths = R.Paths(tmp_path / "out", tmp_path / "work")
    finals = {0.7: (0.50, 0.3), 0.9: (0.62, 0.2), 0.97: (0.62, 0.4)}  # tie on accuracy: higher entropy wins
    for tau, (acc, entropy) in finals.items():
        history = [{"step": 0, "val/answer_accuracy": 0.9}, {"step": 5, "val/answer_accuracy": acc, "val/gen_entropy": entropy,
                                                             "val/self_bleu": 0.5}]
        R.atomic_write_json(paths.result(R.aesl_sweep_id(tau, track.seeds[0])), {"history": history})
    tau, rows = R.chosen_tau(track, paths)
    assert tau == 0.97 and [r["tau"] for r in rows] == [0.7, 0.9, 0.97]


@pytest.mark.distributed
def test_smoke_track_runs_end_to_end_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--track", "cpu", "--smoke", "--out", str(out), "--work", str(work), "--workers", "2"]
    R.main(argv)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary["arms"]) == set(R.ARMS)
    for arm, entry in summary["arms"].items():
        assert len(entry["seeds"]) == 2
        for key in ("test/pass@1", "test/pass@2", "test_hard/greedy_accuracy"):
            assert all(0.0 <= v <= 1.0 for v in entry["rl"][key]["values"]), (arm, key)
    ce = json.loads((out / "runs" / "sft__ce-s0.json").read_text())
    assert ce["history"][0]["step"] == 0 and ce["history"][0]["val/kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    # the turning-point arm starts from DiversityEarlyStopping's peak, the best-accuracy arm from that snapshot
    tp = json.loads((out / "runs" / "grpo__ce_turning_point-s0.json").read_text())
    assert tp["start"].endswith("turning_point/hf_model") and tp["sft_row"]["step"] == ce["turning_point"]["step"]
    best = json.loads((out / "runs" / "grpo__ce_best_acc-s0.json").read_text())
    assert best["sft_row"] == R.best_accuracy_row(ce["history"])
    assert len(summary["sweep"]) == len([r for r in R.plan(R.TRACKS["cpu"].smoke(), R.Paths(out, work)) if r.kind == "sweep"])
    for name in ("results.md", "diversity_curve.png", "sweep.png", "meta.json"):
        assert (out / name).is_file(), name
    report = (out / "results.md").read_text()
    assert "CE, diversity turning point" in report and "Spearman" in report
    # a rerun finds every run finished and only rewrites the report; a lost work folder (a fresh clone of the
    # results) gets its data regenerated to the recorded digests and the base weights back from the results
    weights = (work / "base" / "hf_model" / "model.safetensors").read_bytes()
    assert (out / "base_model" / "model.safetensors").read_bytes() == weights
    test_split = (work / "data" / "test.jsonl").read_bytes()
    shutil.rmtree(work / "data")
    shutil.rmtree(work / "base")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    R.main(argv)
    assert (work / "base" / "hf_model" / "model.safetensors").read_bytes() == weights
    assert (work / "data" / "test.jsonl").read_bytes() == test_split
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert len(json.loads((out / "meta.json").read_text())["invocations"]) == 2


@pytest.mark.integration
def test_gpu_track_smoke_runs_on_cpu_with_the_real_model(tmp_path):
    """The GPU-sized track's pipeline (SmolLM2-135M-Instruct, no pre-training) for a few steps on CPU."""
    out, work = tmp_path / "out", tmp_path / "work"
    R.main(["--track", "gpu", "--smoke", "--out", str(out), "--work", str(work), "--workers", "2"])
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["base"] is None  # the real model is the base: nothing pre-trained
    assert set(summary["arms"]) == set(R.ARMS)
    grpo = json.loads((out / "runs" / "grpo__aesl-s0.json").read_text())
    assert grpo["steps"] == 2 and 0.0 <= grpo["eval"]["test_hard"]["pass@1"] <= 1.0
    assert "smollm2" in json.loads((out / "runs" / "grpo__base-s0.json").read_text())["start"]


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
    cell = json.loads((out / "runs" / "ablation__aesl-n8-hard-s0.json").read_text())
    assert cell["difficulty"] == "hard" and "pass@2" in cell["eval"]
    coldstart = (work / "ablation" / "aesl-n8-hard-s0" / "data" / "coldstart.jsonl").read_text().splitlines()
    assert len(coldstart) == 8 and all(json.loads(line)["num_steps"] == 3 for line in coldstart)
    assert (out / "ablation.md").is_file() and (out / "ablation.png").is_file()
    assert (out / "runs" / "base.json").is_file()  # the base model the main table would use, made once
    # AESL uses the threshold the main table chose on its validation split (its sweep ran as a dependency)
    track = R.TRACKS["cpu"].smoke()
    assert cell["tau"] == R.chosen_tau(track, R.Paths(out, work))[0]
    for size_difficulty, row in table.items():
        ce, aesl = row["ce_best_acc"]["pass@1"][0], row["aesl"]["pass@1"][0]
        assert row["aesl_minus_ce_pass@1"][0] == pytest.approx(aesl - ce), size_difficulty  # one seed: the plain difference
    # --report-only runs nothing and reports the finished cells only (an interrupted ablation)
    (out / "runs" / "ablation__aesl-n8-hard-s0.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    R.main(["--track", "cpu", "--smoke", "--ablation", "--report-only", "--out", str(out), "--work", str(work)])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert "(7 of 8 planned cells finished)" in (out / "ablation.md").read_text()
    table = json.loads((out / "ablation.json").read_text())["table"]
    assert table["8/hard"]["aesl"]["seeds"] == [] and table["8/easy"]["aesl"]["seeds"] == [0]
    # the main table refuses to report from unfinished runs
    with pytest.raises(SystemExit, match="every run finished"):
        R.main(["--track", "cpu", "--smoke", "--report-only", "--out", str(out), "--work", str(work)])
