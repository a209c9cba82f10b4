"""GRPO resumed from a checkpoint continues exactly as the uninterrupted run: the same prompts, the same sampled
rollouts (the random states are restored), hence the same logs (gen_length, loss, kl, validation) and
bit-identical final weights."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from aesl_lightning.data import PromptDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule

STEPS = 6  # 6 prompts in batches of 2: 3 steps per epoch, 2 epochs


def high_chars(prompts, completions, **_):
    return [sum((ord(c) - 32) / 94 for c in text) / len(text) if text else 0.0 for text in completions]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(RuntimeError):
    pass


class Record(Callback):
    """Per training step: the prompts, the sampled completions and the logged gen_length, loss and kl; per
    validation its metrics; and a crash as the step after `kill_after` begins (its checkpoint is on disk)."""

    def __init__(self, kill_after: int | None = None):
        self.steps: list[tuple] = []
        self.validations: list[tuple] = []
        self.kill_after = kill_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_after:
            raise Killed(f"killed after step {trainer.global_step}")
        self.prompts = tuple(batch["prompt"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.steps.append((trainer.global_step, self.prompts, tuple(pl_module.last_texts),
                           *(float(metrics[f"train/{k}"]) for k in ("gen_length", "loss", "kl", "reward/mean"))))

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        values = tuple(sorted((k, float(v)) for k, v in metrics.items() if k.startswith("val/")))
        assert any("entropy" in k for k, _ in values), values  # the sampled evaluation ran
        self.validations.append((trainer.global_step, values))


class Texts(GRPOModule):
    def make_rollout(self, batch, timer=None):
        rollout = super().make_rollout(batch, timer)
        self.last_texts = rollout.generation.texts
        return rollout


def fit(folder, record, ckpt_path=None):
    L.seed_everything(0)
    module = Texts("tiny-llama", lr=2e-2, evaluation=GRPOEvaluation(num_samples=2, max_new_tokens=4, greedy=False),
                   grpo=GRPOConfig(num_generations=4, max_new_tokens=6, beta=0.04, temperature=1.0,
                                   reward_funcs=[f"{__name__}.high_chars"], log_completions_every_n_steps=0))
    data = PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=6, seed=1, max_steps=1),
                            val_size=2, test_size=0, batch_size=2, max_prompt_length=400, seed=3)
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, callbacks=[record, checkpoints], log_every_n_steps=1)
    try:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return trainer, module


@pytest.mark.parametrize("kill_after", [4, 3])  # mid-epoch, after a validation; at an epoch's end
def test_grpo_killed_after_a_checkpoint_resumes_bit_identically(tmp_path, kill_after):
    whole_record = Record()
    whole, whole_module = fit(tmp_path / "whole", whole_record)
    assert whole.global_step == STEPS and len(whole_record.steps) == STEPS
    assert len({texts for _, _, texts, *_ in whole_record.steps}) == STEPS  # the rollouts differ step to step

    first_record = Record(kill_after=kill_after)
    first, _ = fit(tmp_path / "first", first_record)
    assert first.global_step == kill_after
    saved = torch.load(tmp_path / "first" / f"step={kill_after}.ckpt", weights_only=True)  # plain types only
    assert len(saved["aesl_lightning"]["random_states"]) == 1  # one process: one rank's states

    second_record = Record()
    second, second_module = fit(tmp_path / "second", second_record, ckpt_path=tmp_path / "first" / f"step={kill_after}.ckpt")
    assert second.global_step == STEPS
    assert first_record.steps + second_record.steps == whole_record.steps
    assert [step for step, *_ in whole_record.validations] == [2, 4, 6]
    # the killed run validated up to its last step; the resumed run validates from the checkpoint's step on
    # (a checkpoint written before the validation of its step runs that validation again)
    assert first_record.validations == whole_record.validations[:len(first_record.validations)]
    assert second_record.validations == [v for v in whole_record.validations if v[0] >= kill_after]
    whole_state, second_state = whole_module.state_dict(), second_module.state_dict()
    assert whole_state.keys() == second_state.keys()
    assert all(torch.equal(second_state[k], v) for k, v in whole_state.items())


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from aesl_lightning.infra.rng_state import capture_random_state, restore_random_state

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), float(np.random.randn())

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    np.random.randn()  # NumPy's cached second Gaussian is part of its state
    torch.save({"states": [capture_random_state(torch.device("cpu"))]}, tmp_path / "s.pt")
    expected = draws()
    assert draws() != expected  # the generators moved on
    restore_random_state(torch.load(tmp_path / "s.pt", weights_only=True)["states"][0], torch.device("cpu"))
    assert draws() == expected
