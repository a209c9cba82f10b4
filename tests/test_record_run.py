"""scripts/record_run.py: a fit run as a subprocess, recorded with its commit, load, series, figure and verdict."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def _script():
    spec = importlib.util.spec_from_file_location("record_run", ROOT / "scripts" / "record_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return ["--", "--model.name_or_path", "tiny-llama", "--model.lr", "3e-3", "--model.warmup_steps", "0",
            "--trainer.max_steps", "4", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--data.synthetic.num_examples", "24", "--data.val_size", "8", "--data.batch_size", "4", "--data.max_length", "400",
            "--model.val_generation.max_new_tokens", "8", "--model.val_generation.num_prompts", "4", *extra]


def test_a_run_is_recorded_with_its_series_figure_and_verdict(tmp_path):
    out = tmp_path / "record"
    assert _script().main(["--config", QUICKSTART, "--out", str(out), *_tiny(tmp_path)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["returncode"] == 0 and record["wall_seconds"] > 0
    assert record["command"] == " ".join(["python -m aesl_lightning fit --config", QUICKSTART, *_tiny(tmp_path)[1:]])
    assert len(record["commit"]) >= 7 and record["machine"]["end"]["commit"]
    assert record["load_average"]["n"] >= 1 and isinstance(record["idle"], bool)
    # the quickstart's schedule, cut at the run's 4 steps: validations at 0, 1, 2, 4, each with its loss and generation
    assert record["validation_steps"] == [0, 1, 2, 4]
    assert all("val/loss" in record["series_by_step"][str(s)] for s in (0, 1, 2, 4))
    assert set(record["generation_seconds"]) == {"0", "1", "2", "4"}
    assert Path(record["run_dir"]).parent == tmp_path / "logs" / "quickstart"
    assert (out / "diversity.png").read_bytes() == (Path(record["run_dir"]) / "diversity.png").read_bytes()
    assert record["run_summary"][0] == "Run finished at step 4." and record["verdict"] == record["run_summary"][-1].strip()
    assert "turning point" in record["verdict"].lower()


def test_a_failed_run_leaves_its_error_and_output_tail(tmp_path):
    out = tmp_path / "record"
    code = _script().main(["--config", QUICKSTART, "--out", str(out), *_tiny(tmp_path, "--model.lr", "-1")])
    assert code != 0
    record = json.loads((out / "run.json").read_text())
    assert record["returncode"] == code and record["error"] == "the fit failed"
    assert any("lr" in line for line in record["output_tail"])
    assert not (out / "diversity.png").exists()


def test_the_summary_block_ends_before_what_the_progress_bar_redraws_after_it():
    lines = ["step 31/32 ...", "Run finished at step 32.", "  TensorBoard logs : lightning_logs/q/version_0",
             "  No turning point within 32 steps: the peak at step 8 has not been followed by 2 validation(s) in a row",
             "step 32/32 (epoch 1) ━━━━ 32/32 0:02:16", "                                  val/loss: 0.143",
             "                                  0.098"]
    block = _script().run_summary(lines)
    assert block[0] == "Run finished at step 32." and len(block) == 3
    assert block[-1].strip().startswith("No turning point")  # the verdict, not the bar's last metric
