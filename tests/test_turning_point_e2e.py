"""End to end: SFT on a set whose completions are all the same collapses the model's sampling entropy, and
DiversityEarlyStopping, reading the real sampled metrics, stops the run at the turning point."""

import json

import lightning as L
import torch

from aesl_lightning.data import SFTDataModule
from aesl_lightning.early_stopping import DiversityEarlyStopping
from aesl_lightning.losses import LossConfig
from aesl_lightning.sft import SFTModule, ValidationGeneration


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
