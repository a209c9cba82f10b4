"""A run that DiversityEarlyStopping stopped at its turning point, resumed from its last checkpoint, trains no
further: no training step, no validation, no new history entry, the same turning_point.json and export."""

import json
import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from aesl_lightning.data.datamodule import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.training.early_stopping import DiversityEarlyStopping
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration


class Record(Callback):
    """The global step of every training batch and every validation (sanity checks aside)."""

    def __init__(self):
        self.train_steps, self.validations = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_steps.append(trainer.global_step)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations.append(trainer.global_step)


def fit(tmp_path, ckpt_path=None):
    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, scheduler="constant",
                       val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=40), val_size=4, batch_size=4,
                         max_length=400, seed=3)
    # the validation loss falls as the model learns: scored as "diversity" (weight +1) it peaks at once and falls
    stopper = DiversityEarlyStopping(monitor="val/loss", weights=[1.0], smoothing="none", patience=1,
                                     dirpath=str(tmp_path / "tp"))
    record = Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=40, val_check_interval=2, check_val_every_n_epoch=None,
                        callbacks=[record, stopper, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, record, module


def test_a_resumed_run_that_had_stopped_at_its_turning_point_is_a_no_op(tmp_path, caplog):
    first, first_record, _ = fit(tmp_path)
    summary_path = tmp_path / "tp" / "turning_point.json"
    summary = json.loads(summary_path.read_text())
    assert summary["stopped"] and first.global_step < 40  # the callback stopped the run
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == first.global_step
    exported = (tmp_path / "tp" / "hf_model" / "model.safetensors").read_bytes()
    json_before = summary_path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        second, second_record, module = fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert "already stopped at its turning point" in caplog.text
    assert second.global_step == first.global_step
    assert second_record.train_steps == [] and second_record.validations == []
    assert not any(k.startswith("val/") for k in second.callback_metrics)  # no validation values logged again
    assert summary_path.read_bytes() == json_before  # no new history entry, the same decision
    assert (tmp_path / "tp" / "hf_model" / "model.safetensors").read_bytes() == exported
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == first.global_step
    assert all(torch.equal(module.state_dict()[k], v) for k, v in saved["state_dict"].items())
