"""The CLI's first screen: a progress bar over the run's step budget, known third-party noise filtered."""

import logging
import warnings
from types import SimpleNamespace

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from aesl_lightning.cli import _quiet_known_noise
from aesl_lightning.training.progress import StepProgressBar, StepTQDMProgressBar, _description, use_step_progress_bar


def test_the_bar_shows_the_step_budget_not_epoch_minus_two():
    trainer = SimpleNamespace(estimated_stepping_batches=32, global_step=12, current_epoch=0)
    assert _description(trainer) == "step 12/32 (epoch 0)"
    bar = StepProgressBar()
    bar._trainer = trainer
    assert bar.total_train_batches == 32 and bar._get_train_description(0) == "step 12/32 (epoch 0)"


def test_only_lightnings_default_bar_is_replaced():
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False)
    use_step_progress_bar(trainer)
    bars = [c for c in trainer.callbacks if isinstance(c, (RichProgressBar, TQDMProgressBar))]
    assert len(bars) == 1 and type(bars[0]) in (StepProgressBar, StepTQDMProgressBar)

    class Mine(TQDMProgressBar):
        pass

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, callbacks=[Mine()])
    use_step_progress_bar(trainer)
    assert any(type(c) is Mine for c in trainer.callbacks)


def test_known_noise_is_filtered_and_other_warnings_still_show(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something the user must see", UserWarning)
    assert [str(w.message) for w in caught] == ["something the user must see"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try our cloud")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
