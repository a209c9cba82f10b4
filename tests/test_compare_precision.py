"""scripts/compare_precision.py: two recorded fits (fp32, bf16-mixed) compared against tolerances stated up front."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compare_precision", ROOT / "scripts" / "compare_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(wall=100.0, gen=(30.0, 20.0), val_loss=(1.5, 0.4), acc=(0.0, 0.5), train=(2.0, 1.0, 0.5)) -> dict:
    series = {}
    for step, (loss, a, g) in zip((0, 4), zip(val_loss, acc, gen)):
        series[str(step)] = {"val/loss": loss, "val/answer_accuracy": a, "val/distinct_answers": 1.5, "val/generation_seconds": g}
    for step, loss in enumerate(train, start=1):
        series.setdefault(str(step), {})["train/loss"] = loss
    return {"command": "python -m aesl_lightning fit --config experiments/quickstart.yaml --trainer.max_steps 4",
            "returncode": 0, "wall_seconds": wall, "commit": "abc1234", "idle": True, "verdict": "No turning point",
            "machine": {"start": {"cpu": {"model": "AMD EPYC", "cores": 2, "flags": ["avx512_bf16"]}}},
            "generation_seconds": {"0": gen[0], "4": gen[1]}, "series_by_step": series}


def test_equal_runs_match_and_the_speedups_are_the_ratios():
    m = _script()
    ref, cand = _record(), _record(wall=50.0, gen=(15.0, 10.0))
    result = m.compare(ref, cand, prompts=8)
    assert result["matches"] and result["failures"] == []
    assert result["speed"]["wall_speedup"] == pytest.approx(2.0)
    assert result["speed"]["generation_speedup"] == pytest.approx(50 / 25)
    assert result["speed"]["rest_seconds"] == [50.0, 25.0] and result["speed"]["rest_speedup"] == pytest.approx(2.0)
    assert result["train_loss"] == {"steps": 3, "median_rel_diff": 0.0, "max_rel_diff": 0.0}
    assert [r["step"] for r in result["validations"]] == [0, 4]
    assert "matches" in m.markdown(result, ("32-true", "bf16-mixed"))


def test_each_tolerance_fails_where_it_is_exceeded_and_names_the_step():
    m = _script()
    ref = _record()
    loss = m.compare(ref, _record(val_loss=(1.5, 0.4 * 1.05)), prompts=8)  # 5 % > 3 % at step 4
    assert not loss["matches"] and loss["failures"] == [loss["failures"][0]] and "step 4" in loss["failures"][0]
    assert m.compare(ref, _record(val_loss=(1.5, 0.4 * 1.02)), prompts=8)["matches"]  # 2 % is inside
    two = m.compare(ref, _record(acc=(0.0, 0.25)), prompts=8)  # two prompts of 8 apart
    assert not two["matches"] and "greedy accuracy at step 4" in two["failures"][0]
    assert m.compare(ref, _record(acc=(0.0, 0.375)), prompts=8)["matches"]  # one prompt: all 8 prompts can resolve
    train = m.compare(ref, _record(train=(2.0, 1.1, 0.6)), prompts=8)  # relative differences 0, 10 %, 20 %: median 10 %
    assert not train["matches"] and train["train_loss"]["median_rel_diff"] == pytest.approx(0.1)
    assert "does not match" in m.markdown(train, ("32-true", "bf16-mixed"))


def test_a_failed_or_unrelated_run_is_an_error_not_a_comparison():
    m = _script()
    broken = {**_record(), "returncode": 1, "error": "the fit failed"}
    with pytest.raises(ValueError, match="candidate run did not finish.*the fit failed"):
        m.compare(_record(), broken)
    other = copy.deepcopy(_record())
    other["series_by_step"] = {"7": {"val/loss": 1.0}}
    with pytest.raises(ValueError, match="share no validation step"):
        m.compare(_record(), other)


def test_the_prompt_count_comes_from_the_recorded_command_or_its_config():
    m = _script()
    assert m.prompts_of(_record()) == 8  # experiments/quickstart.yaml: model.val_generation.num_prompts
    overridden = {**_record(), "command": _record()["command"] + " --model.val_generation.num_prompts 3"}
    assert m.prompts_of(overridden) == 3


def test_two_tiny_fits_are_recorded_and_compared_then_rebuilt_from_the_records(tmp_path):
    m = _script()
    out = tmp_path / "precision"
    tiny = ["--model.name_or_path", "tiny-llama", "--model.lr", "3e-3", "--model.warmup_steps", "0",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--data.synthetic.num_examples", "16", "--data.val_size", "4", "--data.batch_size", "4", "--data.max_length", "400",
            "--model.val_generation.max_new_tokens", "4", "--model.val_generation.num_prompts", "2"]
    assert m.main(["--out", str(out), "--", *tiny]) == 0
    records = {p: json.loads((out / p / "run.json").read_text()) for p in ("32-true", "bf16-mixed")}
    assert records["bf16-mixed"]["command"].endswith("--trainer.precision bf16-mixed")
    assert all("train/loss" in r["series_by_step"]["1"] for r in records.values())
    first = json.loads((out / "comparison.json").read_text())
    assert first["resolution"]["greedy_accuracy_prompts"] == 2
    assert [r["step"] for r in first["validations"]] == [0, 1, 2]
    (out / "comparison.json").unlink()
    assert m.main(["--out", str(out), "--report"]) == 0  # nothing reruns: the same comparison from the two records
    assert json.loads((out / "comparison.json").read_text()) == first


def test_the_control_runs_fp32_on_one_thread_and_is_judged_by_the_same_rule(tmp_path, monkeypatch):
    """--control adds fp32 with OMP_NUM_THREADS=1 (set only for that fit), compared with fp32 into control.{md,json};
    the bf16 comparison is unchanged."""
    import sys
    import types

    m = _script()
    seen = {}

    def fake_record_run(argv):
        out = Path(argv[argv.index("--out") + 1])
        seen[out.name] = (argv[-1], __import__("os").environ.get("OMP_NUM_THREADS"))
        drift = {"32-true": 0.4, "bf16-mixed": 0.45, "32-true-1-thread": 0.41}[out.name]  # bf16 12.5 % off, control 2.5 %
        out.mkdir(parents=True)
        (out / "run.json").write_text(json.dumps({**_record(val_loss=(1.5, drift)), "threads": seen[out.name][1] or "default"}))
        return 0

    monkeypatch.setitem(sys.modules, "record_run", types.SimpleNamespace(main=fake_record_run))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert m.main(["--out", str(tmp_path), "--control"]) == 0
    assert seen == {"32-true": ("32-true", None), "bf16-mixed": ("bf16-mixed", None), "32-true-1-thread": ("32-true", "1")}
    assert "OMP_NUM_THREADS" not in __import__("os").environ  # restored after the control's fit
    control = json.loads((tmp_path / "control.json").read_text())
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert control["matches"] and set(control["runs"]) == {"32-true", "32-true-1-thread"}
    assert control["runs"]["32-true-1-thread"]["threads"] == "1"
    assert not comparison["matches"] and set(comparison["runs"]) == {"32-true", "bf16-mixed"}
    text = (tmp_path / "control.md").read_text()
    assert "# 32-true-1-thread against 32-true" in text and "32-true-1-thread threads: 1" in text
