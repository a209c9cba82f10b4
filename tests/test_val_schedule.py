"""ValidationSchedule: validation exactly at the listed steps (step 0 before any update), and exact on resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from aesl_lightning.data.datamodule import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration
from aesl_lightning.training.val_schedule import ValidationSchedule, log_spaced_steps


class Seen(Callback):
    """Records the global step at each (non-sanity) validation, and the weights then."""

    def __init__(self):
        self.steps, self.weights = [], {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)
            self.weights[trainer.global_step] = pl_module.model.model.layers[0].self_attn.q_proj.weight.detach().clone()


def fit(tmp_path, schedule, max_steps, ckpt_path=None, extra=(), accumulate=1):
    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, scheduler="constant",
                       val_generation=ValidationGeneration(num_prompts=0), gate_check_batches=0,
                       histogram_every_n_steps=0, update_norm_every_n_steps=0)
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=16), val_size=4, batch_size=4,
                         max_length=400)
    seen = Seen()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[schedule, seen, *extra], logger=False,
                        enable_checkpointing=bool(extra), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=2, check_val_every_n_epoch=None,
                        accumulate_grad_batches=accumulate, default_root_dir=tmp_path)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, seen


def test_log_spaced_steps():
    assert log_spaced_steps(32) == [0, 1, 2, 4, 8, 16, 32]
    assert log_spaced_steps(20) == [0, 1, 2, 4, 8, 16, 20]
    assert log_spaced_steps(10, base=3) == [0, 1, 3, 9, 10]


def test_validates_exactly_at_the_listed_steps_including_step_0(tmp_path):
    # 4 batches per epoch: steps 5 and 9 lie inside epochs 2 and 3; val_check_interval=2 would add 2, 4, 6, 8
    trainer, seen = fit(tmp_path, ValidationSchedule(val_steps=[0, 1, 5, 9]), max_steps=10)
    assert trainer.global_step == 10
    assert seen.steps == [0, 1, 5, 9, 10]  # and the last step: the final weights are validated
    # step 0 is the starting model: its weights differ from those after the first update
    assert not torch.equal(seen.weights[0], seen.weights[1])


def test_log_spaced_default_follows_max_steps_and_counts_optimiser_steps(tmp_path):
    _, seen = fit(tmp_path, ValidationSchedule(), max_steps=4, accumulate=2)
    assert seen.steps == [0, 1, 2, 4]


@pytest.mark.parametrize("stop_at", [4, 5])
def test_a_resumed_run_validates_the_remaining_steps_only(tmp_path, stop_at):
    schedule = [0, 1, 2, 4, 6, 8]
    # a checkpoint after every step of an uninterrupted run: resuming from step 4 or 5 is an interruption there
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _, whole = fit(tmp_path / "whole", ValidationSchedule(val_steps=schedule), max_steps=8, extra=[ckpt])
    assert whole.steps == schedule
    _, second = fit(tmp_path / "second", ValidationSchedule(val_steps=schedule), max_steps=8,
                    ckpt_path=tmp_path / "ck" / f"step={stop_at}.ckpt")
    assert second.steps == [s for s in schedule if s > stop_at]  # none twice, none missed


def test_bad_steps_are_named():
    with pytest.raises(ValueError, match=r"val_steps.*\[-1\]"):
        ValidationSchedule(val_steps=[0, -1])
    with pytest.raises(ValueError, match="base"):
        ValidationSchedule(base=1.0)


def test_a_checkpoint_written_before_its_steps_validation_validates_that_step_on_resume(tmp_path):
    schedule = [0, 2, 4, 6]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    fit(tmp_path / "first", ValidationSchedule(val_steps=schedule), max_steps=6, extra=[ckpt])
    state = torch.load(tmp_path / "ck" / "step=4.ckpt", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("ValidationSchedule")]
    assert state["callbacks"][key]["done"] == [0, 2, 4]
    state["callbacks"][key]["done"] = [0, 2]  # as if written at step 4 before that step's validation
    torch.save(state, tmp_path / "before.ckpt")
    _, second = fit(tmp_path / "second", ValidationSchedule(val_steps=schedule), max_steps=6,
                    ckpt_path=tmp_path / "before.ckpt")
    assert second.steps == [4, 6]


def test_metrics_are_logged_at_the_global_step_so_steps_0_and_1_do_not_collide(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from aesl_lightning.training.plots import read_scalars

    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, val_generation=ValidationGeneration(num_prompts=0),
                       gate_check_batches=0, histogram_every_n_steps=0)
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=16), val_size=4, batch_size=4,
                         max_length=400)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(accelerator="cpu", max_steps=4, callbacks=[ValidationSchedule()], logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    steps, _ = read_scalars(logger.log_dir)["val/loss"]
    assert steps == [0, 1, 2, 4]
