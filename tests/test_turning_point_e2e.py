"""End to end: SFT on a set whose completions are all the same collapses the model's sampling entropy, and
DiversityEarlyStopping, reading the real sampled metrics, stops the run at the turning point."""

import json

import lightning as L
import torch

from aesl_lightning.data import SFTDataModule
from aesl_lightning.training.early_stopping import DiversityEarlyStopping
from aesl_lightning.maths.losses import LossConfig
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration


def test_collapsing_diversity_stops_training_at_the_peak(tmp_path):
    torch.manual_seed(0)
    data_file = tmp_path / "same.jsonl"
    with open(data_file, "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"Q{i}: what now?", "completion": "ok", "answer": "0"}) + "\n")
    module = SFTModule(
        "tiny-llama", lr=3e-2, warmup_steps=0, scheduler="constant", loss=LossConfig(name="ce"),
        val_generation=ValidationGeneration(num_prompts=4, num_samples=4, max_new_tokens=6, kl_to_base=False),
    )
    stopper = DiversityEarlyStopping(monitor="val/gen_entropy", smoothing="none", warmup=0, patience=2,
                                     dirpath=str(tmp_path / "tp"), export_hf=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=40, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[stopper], default_root_dir=tmp_path,
    )
    trainer.fit(module, SFTDataModule(train=str(data_file), val_size=4, batch_size=4, max_length=200))

    summary = json.loads((tmp_path / "tp" / "turning_point.json").read_text())
    assert summary["turning_point_detected"] and summary["stopped"]
    assert trainer.global_step < 40  # stopped early
    history = [h for h in summary["history"] if h["status"] != "skipped"]
    entropies = [h["values"]["val/gen_entropy"] for h in history]
    peak = summary["turning_point"]
    # the peak is the most diverse validation, and the last two validations fell below it
    assert peak["values"]["val/gen_entropy"] == max(entropies)
    assert all(e < peak["values"]["val/gen_entropy"] for e in entropies[-2:])
    assert entropies[-1] < 0.5 * entropies[0]  # memorising one completion collapses the entropy
    assert (tmp_path / "tp" / "peak.ckpt").exists()


def test_a_tiny_fit_writes_the_figure_and_prints_the_verdict(tmp_path, capsys):
    from lightning.pytorch.loggers import TensorBoardLogger

    from aesl_lightning.training.callbacks import RunSummary
    from aesl_lightning.data.synthetic import ArithmeticConfig
    from aesl_lightning.training.plots import read_scalars
    from aesl_lightning.training.val_schedule import ValidationSchedule

    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, gate_check_batches=0, histogram_every_n_steps=0,
                       val_generation=ValidationGeneration(num_prompts=2, num_samples=2, max_new_tokens=4, kl_to_base=False))
    stopper = DiversityEarlyStopping(monitor="val/gen_entropy", smoothing="none", patience=1, stop=False,
                                     export_hf=False)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ValidationSchedule(), stopper, RunSummary()])
    trainer.fit(module, SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=16), val_size=4,
                                      batch_size=4, max_length=400))

    figure = tmp_path / "run" / "version_0" / "diversity.png"
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert read_scalars(logger.log_dir)["val/gen_entropy"][0] == [0, 1, 2, 4]
    out = capsys.readouterr().out
    assert f"diversity figure : {figure}" in out
    expected = f"Turning point at step {stopper.rule.turning_point['step']}" if stopper.rule.fired else \
        "No turning point within 4 steps"
    assert expected in out
