"""The diversity figure from TensorBoard event files."""

import json
import math

import matplotlib.image
import pytest
from torch.utils.tensorboard import SummaryWriter

from aesl_lightning.training.plots import diversity_figure, main, plot_diversity, read_scalars, turning_point_step


def write_run(run_dir, tags=("val/gen_entropy", "val/self_bleu", "val/answer_accuracy"), turning_point=None):
    writer = SummaryWriter(str(run_dir))
    for i in range(1, 21):
        step = 10 * i
        values = {
            "val/gen_entropy": 1.0 + math.exp(-(((i - 6) / 4) ** 2)),
            "val/token_entropy": 0.8 + 0.5 * math.exp(-i / 8),
            "val/self_bleu": 0.3 + 0.4 * (1 - math.exp(-i / 6)),
            "val/answer_accuracy": min(0.9, 0.05 * i),
            "diversity/score_smoothed": 1.0 + math.exp(-(((i - 7) / 4) ** 2)),
        }
        for tag in tags:
            writer.add_scalar(tag, values[tag], step)
    if turning_point is not None:
        writer.add_scalar("diversity/turning_point_step", turning_point, 120)
    writer.close()
    return run_dir


def labels(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_png_is_written_and_non_trivial(tmp_path):
    run = write_run(tmp_path / "version_0", turning_point=60)
    out = plot_diversity(run, tmp_path / "fig" / "diversity.png")
    assert out == tmp_path / "fig" / "diversity.png" and out.stat().st_size > 20_000
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (840, 960)  # 8 x 7 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas
    fig = diversity_figure(run)
    assert "turning point (step 60)" in labels(fig)
    assert any("val/self_bleu" in label for label in labels(fig))
    assert "not logged" not in fig.get_suptitle()


def test_turning_point_comes_from_the_json_before_the_scalar(tmp_path):
    run = write_run(tmp_path / "version_0", turning_point=60)
    assert turning_point_step(run) == 60
    (run / "turning_point").mkdir()
    summary = {"turning_point": {"step": 51, "log_step": 50}}
    (run / "turning_point" / "turning_point.json").write_text(json.dumps(summary))
    assert turning_point_step(run) == 50
    # A selector run that found no turning point falls back to the scalar; with neither there is no line.
    (run / "turning_point" / "turning_point.json").write_text(json.dumps({"turning_point": None}))
    assert turning_point_step(run) == 60
    no_scalar = write_run(tmp_path / "version_1")
    (no_scalar / "turning_point").mkdir()
    (no_scalar / "turning_point" / "turning_point.json").write_text(json.dumps({"turning_point": None}))
    assert turning_point_step(no_scalar) is None
    assert not any("turning point" in label for label in labels(diversity_figure(no_scalar)))


def test_missing_series_are_named_not_fatal(tmp_path):
    run = write_run(tmp_path / "version_0", tags=("val/token_entropy",))
    fig = diversity_figure(run)
    assert "not logged: self-BLEU, answer accuracy" in fig.get_suptitle()
    assert labels(fig) == ["entropy (teacher-forced) [val/token_entropy]"]
    assert plot_diversity(run).name == "diversity.png"


def test_last_value_per_step_wins_and_steps_are_sorted(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step, value in [(20, 2.0), (10, 1.0), (20, 3.0)]:  # a resumed run logs step 20 again
        writer.add_scalar("val/gen_entropy", value, step)
    writer.close()
    assert read_scalars(tmp_path)["val/gen_entropy"] == ([10, 20], [1.0, 3.0])


def test_a_folder_without_events_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        plot_diversity(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        plot_diversity(tmp_path / "nope")


def test_parent_folder_with_one_run_is_accepted_and_several_are_refused(tmp_path, capsys):
    write_run(tmp_path / "lightning_logs" / "version_0")
    main([str(tmp_path / "lightning_logs"), "--out", str(tmp_path / "a.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "a.png") and (tmp_path / "a.png").is_file()
    write_run(tmp_path / "lightning_logs" / "version_1")
    with pytest.raises(ValueError, match="several runs"):
        plot_diversity(tmp_path / "lightning_logs")


def test_validations_behind_the_format_gate_are_shaded_and_named_once(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "turning_point").mkdir()
    history = [{"step": s, "log_step": s, "status": "format" if s <= 30 else "peak"} for s in range(10, 210, 10)]
    (run / "turning_point" / "turning_point.json").write_text(json.dumps({"turning_point": None, "history": history}))
    fig = diversity_figure(run)
    assert labels(fig).count("format not learned yet: not considered by the rule") == 1
    spans = [p for ax in fig.axes for p in ax.patches if p.get_label().startswith("format not learned")]
    assert len(spans) == 2  # one per panel (entropy / self-BLEU and accuracy)
    assert any("no turning point within 200 steps" in t.get_text() for ax in fig.axes for t in ax.texts)
