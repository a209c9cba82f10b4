"""Mid-epoch resume: a run killed after any step and resumed from that step's checkpoint trains on the same
batches, in the same order, and ends with bit-identical weights."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from aesl_lightning.data.datamodule import EpochShuffleSampler, ResumableDataLoader, SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

STEPS_PER_EPOCH, EPOCHS = 5, 2  # 20 examples in batches of 4


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(RuntimeError):
    pass


class Record(Callback):
    """The examples of every training batch (as token tuples), and a crash after step `kill_after`."""

    def __init__(self, kill_after: int | None = None):
        self.batches: list[tuple] = []
        self.kill_after = kill_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # killed as the next step begins: the checkpoint of step `kill_after` is on disk (Lightning runs
        # ModelCheckpoint last in on_train_batch_end), and nothing of the next step has happened
        if self.kill_after is not None and trainer.global_step == self.kill_after:
            raise Killed(f"killed after step {trainer.global_step}")
        self.batches.append((trainer.current_epoch, tuple(map(tuple, batch["input_ids"].tolist()))))


def fit(tmp_path, name, record, ckpt_path=None, shuffle=True):
    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, scheduler="linear",
                       val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=20), val_size=4, batch_size=4,
                         max_length=400, shuffle=shuffle, seed=3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, callbacks=[record, checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        try:
            trainer.fit(module, data, ckpt_path=ckpt_path)
        except Killed:
            pass
    return trainer, module


@pytest.mark.parametrize("kill_after, shuffle", [(3, True), (7, True), (2, False)])
def test_resume_after_a_mid_epoch_kill_matches_the_uninterrupted_run(tmp_path, kill_after, shuffle):
    whole_record = Record()
    whole, whole_module = fit(tmp_path, "whole", whole_record, shuffle=shuffle)
    assert whole.global_step == STEPS_PER_EPOCH * EPOCHS
    assert len(set(whole_record.batches)) == len(whole_record.batches)  # every batch differs: the check has teeth

    first_record = Record(kill_after=kill_after)
    first, _ = fit(tmp_path, "first", first_record, shuffle=shuffle)
    assert first.global_step == kill_after and kill_after % STEPS_PER_EPOCH != 0  # mid-epoch

    second_record = Record()
    second, second_module = fit(tmp_path, "second", second_record, ckpt_path=tmp_path / "first" / f"step={kill_after}.ckpt",
                                shuffle=shuffle)
    assert second.global_step == whole.global_step
    assert first_record.batches + second_record.batches == whole_record.batches
    whole_state, second_state = whole_module.state_dict(), second_module.state_dict()
    assert all(torch.equal(second_state[k], v) for k, v in whole_state.items())


def test_the_loader_state_holds_the_trainers_position_and_skips_on_load():
    data = list(range(10))
    loader = ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(10, seed=1),
                                 progress=lambda: (2, 2, 1))
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2, "world_size": 1, "batch_size": 3, "num_items": 10}
    fresh = ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(10, seed=1))
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)
    order = EpochShuffleSampler(10, seed=1).order(2)
    assert [int(x) for batch in fresh for x in batch] == order[6:]
    assert [int(x) for batch in fresh for x in batch] == order  # the skip applies once
    changed = ResumableDataLoader(data[:9], batch_size=3, sampler=EpochShuffleSampler(9, seed=1))
    changed.load_state_dict(state)  # different data: no skip (and a warning)
    changed.sampler.set_epoch(2)
    assert len([x for batch in changed for x in batch]) == 9


class RecordValidation(Callback):
    """The global step of every validation that finished, and a crash as the one at `kill_at` starts."""

    def __init__(self, kill_at: int | None = None):
        self.steps: list[int] = []
        self.kill_at = kill_at

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.global_step == self.kill_at:
            raise Killed(f"killed in the validation at step {trainer.global_step}")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def fit_validating(tmp_path, name, record, ckpt_path=None):
    torch.manual_seed(0)
    module = SFTModule("tiny-llama", lr=1e-2, warmup_steps=0, scheduler="linear",
                       val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=20), val_size=4, batch_size=4,
                         max_length=400, seed=3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, callbacks=[record, checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2, limit_val_batches=1)
    try:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return trainer, module


def test_a_validation_interrupted_by_a_kill_is_run_again_after_resuming(tmp_path):
    whole_record = RecordValidation()
    whole, whole_module = fit_validating(tmp_path, "whole", whole_record)
    assert whole_record.steps == [2, 4, 7, 9]

    first_record = RecordValidation(kill_at=4)
    fit_validating(tmp_path, "first", first_record)
    assert first_record.steps == [2]
    second_record = RecordValidation()
    _, second_module = fit_validating(tmp_path, "second", second_record, ckpt_path=tmp_path / "first" / "step=4.ckpt")
    assert first_record.steps + second_record.steps == whole_record.steps
    whole_state, second_state = whole_module.state_dict(), second_module.state_dict()
    assert all(torch.equal(second_state[k], v) for k, v in whole_state.items())
