"""The diversity turning-point rule on scripted sequences, and the callback in real tiny Trainer fits."""

import json
import logging
import random

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForCausalLM

from aesl_lightning.data.datamodule import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.training.early_stopping import (
    DiversityEarlyStopping,
    TurningPointConfig,
    TurningPointRule,
    smooth,
)
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

ENT, BLEU = "val/gen_entropy", "val/self_bleu"


def run(values, key=ENT, **config):
    """Feed `values` (floats, or dicts for several keys) to a fresh rule; returns the rule and the updates."""
    rule = TurningPointRule(TurningPointConfig(monitor=config.pop("monitor", key), **config))
    updates = [rule.update(v if isinstance(v, dict) else {key: v}, step=10 * (i + 1)) for i, v in enumerate(values)]
    return rule, updates


def fired_index(updates):
    fired = [i for i, u in enumerate(updates) if u.fired]
    assert len(fired) <= 1
    return fired[0] if fired else None


# ----------------------------------------------------------------------------------------------------
# The rule


def test_rise_then_fall_fires_after_patience_and_points_at_the_peak():
    rule, updates = run([1, 2, 3, 4, 3.95, 3.5, 3.0, 2.0], smoothing="none", patience=2, min_delta=0.1)
    # 3.95 is within min_delta of the peak (no count); 3.5 and 3.0 are the two falls.
    assert [u.status for u in updates][3:7] == ["peak", "near", "below", "below"]
    assert fired_index(updates) == 6
    assert rule.turning_point["index"] == 3 and rule.turning_point["step"] == 40
    assert rule.fired_at["index"] == 6 and rule.peak is rule.turning_point


def test_a_value_near_the_peak_resets_the_count():
    _, updates = run([4, 3, 3.95, 3, 3], smoothing="none", patience=2, min_delta=0.1)
    assert fired_index(updates) == 4  # not 2: the run of falls was broken at index 2


def test_noisy_plateau_does_not_fire_with_min_delta_above_the_noise():
    rng = random.Random(0)
    values = [1.0 + i * 0.2 for i in range(5)] + [2.0 + rng.uniform(-0.05, 0.05) for _ in range(40)]
    rule, updates = run(values, smoothing="none", patience=3, min_delta=0.11)
    assert fired_index(updates) is None and not rule.fired
    # The same sequence with no tolerance does fire: the test would notice min_delta being ignored.
    _, updates = run(values, smoothing="none", patience=3, min_delta=0.0)
    assert fired_index(updates) is not None


def test_monotone_rising_never_fires_and_the_peak_is_the_last():
    rule, updates = run([0.5 + 0.1 * i for i in range(12)], patience=1)
    assert fired_index(updates) is None
    assert rule.peak["index"] == 11 and all(u.new_peak for u in updates)


def test_monotone_falling_after_warmup_peaks_at_the_first_counted_validation():
    rule, updates = run([0.1, 0.2, 5, 4, 3, 2], smoothing="none", warmup=2, patience=2)
    assert [u.status for u in updates[:2]] == ["warmup", "warmup"]
    assert rule.history[0]["score"] == 0.1 and rule.history[0]["score_smoothed"] is None
    assert rule.turning_point["index"] == 2 and fired_index(updates) == 4


def test_non_finite_values_are_skipped_without_touching_patience_and_never_fire():
    values = [1, 2, 3, 2, float("nan"), float("inf"), {}, 1.5]  # {}: the key was not logged
    rule, updates = run(values, smoothing="none", patience=2)
    assert [u.status for u in updates[3:]] == ["below", "skipped", "skipped", "skipped", "below"]
    assert [rule.history[i]["values"][ENT] for i in (4, 5, 6)] == [None, None, None]
    assert fired_index(updates) == 7 and rule.turning_point["index"] == 2

    # Skipped validations leave the count where it was: with patience 2, one fall and then only NaNs never fires.
    rule, updates = run([1, 2, 3, 2] + [float("nan")] * 10, smoothing="none", patience=2)
    assert not rule.fired and rule.wait == 1

    # ... and they are invisible to the smoother: the EMA continues from the last finite value.
    rule, _ = run([1, float("nan"), 3], smoothing="ema", alpha=0.5)
    assert rule.history[2]["score_smoothed"] == pytest.approx(0.5 * 3 + 0.5 * 1)


def test_combined_keys_use_default_directions_and_explicit_weights():
    cfg = TurningPointConfig(monitor=[ENT, BLEU, "val/distinct_2"])
    assert cfg.resolved_weights == [1.0, -1.0, 1.0]

    # Entropy flat, self-BLEU rising: the combined score falls, so the rule fires.
    values = [{ENT: 2.0, BLEU: b} for b in (0.5, 0.4, 0.3, 0.35, 0.45, 0.6)]
    rule, updates = run(values, monitor=[ENT, BLEU], smoothing="none", patience=2)
    assert rule.history[0]["score"] == pytest.approx(2.0 - 0.5)
    assert rule.turning_point["index"] == 2 and fired_index(updates) == 4

    rule, _ = run([{ENT: 1.5, BLEU: 0.2}], monitor=[ENT, BLEU], weights=[2.0, -0.5], smoothing="none")
    assert rule.history[0]["score"] == pytest.approx(2.0 * 1.5 - 0.5 * 0.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(monitor="val/my_metric"), "no default direction"),
        (dict(monitor=[ENT, BLEU], weights=[1.0]), "expected 2 weights"),
        (dict(alpha=0.0), "alpha"),
        (dict(patience=0), "patience"),
        (dict(smoothing="median"), "smoothing"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TurningPointConfig(**kwargs)


def test_ema_and_window_smoothing_match_a_hand_computation():
    values = [1.0, 3.0, 2.0, 6.0]
    ema = [1.0, 1.5, 1.625, 2.71875]  # S_1 = x_1, S_j = 0.25 x_j + 0.75 S_{j-1}
    window = [1.0, 2.0, 2.5, 4.0]  # mean of the last 2
    assert smooth(values, "ema", alpha=0.25) == pytest.approx(ema)
    assert smooth(values, "window", window=2) == pytest.approx(window)
    assert smooth(values, "none") == values
    rule, _ = run(values, smoothing="ema", alpha=0.25)
    assert [e["score_smoothed"] for e in rule.history] == pytest.approx(ema)
    rule, _ = run(values, smoothing="window", window=2)
    assert [e["score_smoothed"] for e in rule.history] == pytest.approx(window)

    # Several keys: each is smoothed (reported per key) and the smoothed score is their weighted sum.
    pairs = [{ENT: e, BLEU: b} for e, b in zip(values, [0.1, 0.5, 0.2, 0.3])]
    rule, _ = run(pairs, monitor=[ENT, BLEU], smoothing="window", window=2)
    assert rule.history[3]["smoothed_values"] == pytest.approx({ENT: 4.0, BLEU: 0.25})
    d = [e - b for e, b in zip(values, [0.1, 0.5, 0.2, 0.3])]
    assert [e["score_smoothed"] for e in rule.history] == pytest.approx(smooth(d, "window", window=2))


def test_smoothing_delays_the_turning_point_on_a_single_dip():
    values = [1, 2, 3, 2.6, 3.5, 4, 3, 2, 1]
    _, raw = run(values, smoothing="none", patience=1)
    _, ema = run(values, smoothing="ema", alpha=0.5, patience=1)
    assert fired_index(raw) == 3  # the dip alone fires the unsmoothed rule
    assert fired_index(ema) == 6


def test_state_dict_round_trip_continues_like_an_uninterrupted_rule():
    values = [1, 2, 3, float("nan"), 2.5, 2.6, 2.0, 1.0, 0.5]
    config = dict(smoothing="ema", alpha=0.6, warmup=1, patience=3, min_delta=0.05)
    whole, _ = run(values, **config)
    first, _ = run(values[:5], **config)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation too
    resumed = TurningPointRule(TurningPointConfig(monitor=ENT, **config))
    resumed.load_state_dict(state)
    for i, v in enumerate(values[5:], start=5):
        resumed.update({ENT: v}, step=10 * (i + 1))
    assert resumed.history == whole.history
    assert resumed.turning_point == whole.turning_point and resumed.wait == whole.wait


# ----------------------------------------------------------------------------------------------------
# The callback in a real Trainer

# 16 examples in batches of 4: 4 optimiser steps per epoch, one validation per epoch at steps 4, 8, 12, ...
STEPS_PER_EPOCH = 4
COLLAPSE = {4: 1.0, 8: 2.0, 12: 3.0, 16: 2.5, 20: 2.0, 24: 1.5, 28: 1.0, 32: 0.5}


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model gains nothing from threads, and on a shared 2-core machine they oversubscribe badly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedDiversity(SFTModule):
    """The tiny model, logging a scripted `val/gen_entropy` (a function of the step; not at steps missing from
    the script) and keeping a copy of one weight matrix as it was at each validation."""

    def __init__(self, script: dict[int, float] | None = None):
        super().__init__("tiny-llama", lr=1e-3, val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
        self.script = dict(COLLAPSE if script is None else script)
        self.weights_at: dict[int, torch.Tensor] = {}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        step = self.global_step
        if step in self.script:
            self.log(ENT, self.script[step])
        self.weights_at[step] = self.probe().clone()

    def probe(self) -> torch.Tensor:
        return self.model.model.layers[0].self_attn.q_proj.weight.detach()


def fit(tmp_path, callback, max_epochs, module=None, ckpt_path=None, name="run"):
    torch.manual_seed(0)
    module = module or ScriptedDiversity()
    data = SFTDataModule(
        train="synthetic", synthetic=ArithmeticConfig(num_examples=16), val_size=4, batch_size=4, max_length=400
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=STEPS_PER_EPOCH,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_stops_at_the_turning_point_and_exports_the_peak(tmp_path):
    callback = DiversityEarlyStopping(smoothing="none", patience=2)
    trainer, module = fit(tmp_path, callback, max_epochs=10)

    # Peak at step 12; falls at 16 and 20; stopped at 20 instead of running 40 steps.
    assert trainer.global_step == 20 and trainer.current_epoch == 5
    out = trainer.logger.log_dir + "/turning_point"
    assert str(callback.out_dir) == out

    peak = torch.load(f"{out}/peak.ckpt", weights_only=True)
    assert peak["global_step"] == 12
    q_proj = "model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(peak["state_dict"][q_proj], module.weights_at[12])
    assert not torch.equal(module.weights_at[12], module.weights_at[20])
    assert torch.equal(module.probe(), module.weights_at[20])  # the training module was left as it was

    exported = AutoModelForCausalLM.from_pretrained(f"{out}/hf_model")
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.weight, module.weights_at[12])
    state = exported.state_dict()
    for key, value in peak["state_dict"].items():
        if key.removeprefix("model.") in state:
            assert torch.equal(state[key.removeprefix("model.")], value), key

    summary = json.loads(open(f"{out}/turning_point.json").read())
    assert summary["turning_point_detected"] and summary["stopped"] and summary["stopped_at_step"] == 20
    tp = summary["turning_point"]
    assert (tp["index"], tp["step"], tp["log_step"], tp["epoch"]) == (2, 12, 11, 2)
    assert tp["values"] == {ENT: 3.0} and tp["smoothed_values"] == {ENT: 3.0} and tp["score_smoothed"] == 3.0
    assert summary["fired_at"] == {"index": 4, "step": 20, "epoch": 4}
    assert summary["rule"]["monitor"] == [ENT] and summary["rule"]["patience"] == 2
    assert [e["values"][ENT] for e in summary["history"]] == [1.0, 2.0, 3.0, 2.5, 2.0]
    # paths in the JSON are relative to its own folder, so the folder can be moved or copied whole
    assert summary["hf_model"] == "hf_model" and summary["peak_checkpoint"] == "peak.ckpt"

    acc, logged = scalars(trainer.logger.log_dir)
    assert logged["diversity/turning_point_step"] == [(19, 11.0)]
    # The diversity scalars sit at the same TensorBoard steps as the metric they are computed from.
    assert [s for s, _ in logged["diversity/score_smoothed"]] == [s for s, _ in logged[ENT]] == [3, 7, 11, 15, 19]
    note = acc.Tensors("diversity/turning_point/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "global step 12" in note


def test_stop_false_runs_to_the_end_and_exports_the_peak(tmp_path):
    callback = DiversityEarlyStopping(smoothing="none", patience=2, stop=False, dirpath=str(tmp_path / "select"))
    trainer, module = fit(tmp_path, callback, max_epochs=8)
    assert trainer.global_step == 32
    summary = json.loads((tmp_path / "select" / "turning_point.json").read_text())
    assert summary["turning_point_detected"] and not summary["stopped"]
    assert summary["peak"]["step"] == 12 and len(summary["history"]) == 8
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "select" / "hf_model")
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.weight, module.weights_at[12])
    assert torch.equal(module.probe(), module.weights_at[32])


def test_stop_false_without_a_turning_point_keeps_the_last_peak(tmp_path):
    rising = {4 * i: float(i) for i in range(1, 5)}
    callback = DiversityEarlyStopping(stop=False, export_hf=False, dirpath=str(tmp_path / "tp"))
    trainer, module = fit(tmp_path, callback, max_epochs=4, module=ScriptedDiversity(rising))
    summary = json.loads((tmp_path / "tp" / "turning_point.json").read_text())
    assert not summary["turning_point_detected"] and summary["turning_point"] is None
    assert summary["peak"]["step"] == 16 and summary["hf_model"] is None
    assert torch.load(tmp_path / "tp" / "peak.ckpt", weights_only=True)["global_step"] == 16
    assert not (tmp_path / "tp" / "hf_model").exists()


def test_a_metric_that_is_not_logged_is_skipped_with_a_warning(tmp_path, caplog):
    callback = DiversityEarlyStopping(monitor=BLEU, patience=1, export_hf=False, dirpath=str(tmp_path / "tp"))
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        trainer, _ = fit(tmp_path, callback, max_epochs=2)
    assert trainer.global_step == 8 and not callback.rule.fired
    assert [e["status"] for e in callback.rule.history] == ["skipped", "skipped"]
    assert "not logged by the module" in caplog.text and ENT in caplog.text


def test_validations_without_a_fresh_value_are_skipped_not_read_stale(tmp_path, caplog):
    # As with generation every 2nd validation: nothing logged at steps 8, 16, 24, ...
    every_other = {step: value for step, value in COLLAPSE.items() if step % 8 == 4}
    callback = DiversityEarlyStopping(smoothing="none", patience=2, export_hf=False, dirpath=str(tmp_path / "tp"))
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        trainer, _ = fit(tmp_path, callback, max_epochs=10, module=ScriptedDiversity(every_other))
    statuses = [e["status"] for e in callback.rule.history]
    assert statuses == ["peak", "skipped", "peak", "skipped", "below", "skipped", "below"]
    # Reading the stale 2.0 again at step 24 would have fired there.
    assert trainer.global_step == 28 and callback.rule.turning_point["step"] == 12
    assert caplog.text.count("not logged at this validation") == 1


def test_resumed_run_decides_like_an_uninterrupted_one(tmp_path):
    whole_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "whole"))
    whole, _ = fit(tmp_path, whole_cb, max_epochs=10, name="whole")

    # Interrupted after step 16: past the peak (12) with one fall counted; a rule that forgot it would find
    # its peak at step 20 instead.
    first_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "first"))
    first, first_module = fit(tmp_path, first_cb, max_epochs=4, name="first")
    assert first.global_step == 16 and first_cb.rule.wait == 1
    first.save_checkpoint(tmp_path / "interrupted.ckpt")

    second_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "second"))
    second, _ = fit(tmp_path, second_cb, max_epochs=10, ckpt_path=tmp_path / "interrupted.ckpt", name="second")

    assert second.global_step == whole.global_step == 20
    assert second_cb.rule.history == whole_cb.rule.history
    assert second_cb.rule.turning_point["step"] == whole_cb.rule.turning_point["step"] == 12
    # The resumed run carries its own copy of the first run's peak checkpoint, and exports it.
    assert second_cb.peak_checkpoint == str((tmp_path / "second" / "peak.ckpt").resolve())
    assert (tmp_path / "second" / "peak.ckpt").read_bytes() == (tmp_path / "first" / "peak.ckpt").read_bytes()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "second" / "hf_model")
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.weight, first_module.weights_at[12])
    summary = json.loads((tmp_path / "second" / "turning_point.json").read_text())
    assert summary["peak_checkpoint"] == "peak.ckpt" and summary["hf_model"] == "hf_model"


class Payload:
    """Unpickling this calls open(path, "w"), which creates `path`: proof that a payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _interrupted_checkpoint(tmp_path):
    """A genuine checkpoint after step 16 (peak at 12) of a run whose turning-point folder is `tmp_path/first`."""
    first_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "first"))
    first, module = fit(tmp_path, first_cb, max_epochs=4, name="first")
    first.save_checkpoint(tmp_path / "interrupted.ckpt")
    return torch.load(tmp_path / "interrupted.ckpt", weights_only=True), module


def _with_peak_path(checkpoint, peak_path):
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DiversityEarlyStopping")]
    checkpoint["callbacks"][key]["peak_checkpoint"] = str(peak_path)
    checkpoint["callbacks"][key]["peak_checkpoint_absolute"] = str(peak_path)
    return checkpoint


@pytest.mark.parametrize("where", ["outside", "beside"])
def test_a_resumed_checkpoint_naming_a_crafted_peak_file_never_runs_it(tmp_path, caplog, where):
    checkpoint, _ = _interrupted_checkpoint(tmp_path)
    proof = tmp_path / "pwned"
    # outside: a file outside the resumed checkpoint's folders is never even opened; beside: one next to the
    # resumed checkpoint is read with weights_only=True, which refuses the payload
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    folder = tmp_path / "elsewhere" if where == "outside" else tmp_path / "run"
    folder.mkdir(exist_ok=True)
    evil = folder / "peak.ckpt"
    torch.save({"global_step": 12, "state_dict": {}, "x": Payload(proof)}, evil)
    resume_from = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save(_with_peak_path(checkpoint, evil), resume_from)

    second_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "second"))
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        second, _ = fit(tmp_path, second_cb, max_epochs=10, ckpt_path=resume_from, name="second")
    assert not proof.exists()
    assert second.global_step == 20 and second_cb.rule.turning_point["step"] == 12  # the decision is unchanged
    assert second_cb.peak_checkpoint is None and not (tmp_path / "second" / "hf_model").exists()
    assert "never followed outside its own run folder" in caplog.text
    assert ("refused to load" in caplog.text) == (where == "beside")  # outside: never even opened


def test_a_relative_peak_path_cannot_climb_out_of_the_run_folder(tmp_path, caplog):
    checkpoint, _ = _interrupted_checkpoint(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    proof = tmp_path / "pwned"
    torch.save({"global_step": 12, "x": Payload(proof)}, outside / "peak.ckpt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    resume_from = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save(_with_peak_path(checkpoint, "../../outside/peak.ckpt"), resume_from)
    second_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "second"))
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        fit(tmp_path, second_cb, max_epochs=10, ckpt_path=resume_from, name="second")
    assert not proof.exists() and second_cb.peak_checkpoint is None
    assert "never followed outside" in caplog.text


def test_a_peak_file_holding_another_step_is_not_adopted(tmp_path, caplog):
    checkpoint, _ = _interrupted_checkpoint(tmp_path)
    torch.save({"global_step": 4, "state_dict": {}}, tmp_path / "other.ckpt")
    torch.save(_with_peak_path(checkpoint, tmp_path / "other.ckpt"), tmp_path / "crafted.ckpt")
    second_cb = DiversityEarlyStopping(smoothing="ema", alpha=0.7, patience=2, dirpath=str(tmp_path / "second"))
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        fit(tmp_path, second_cb, max_epochs=10, ckpt_path=tmp_path / "crafted.ckpt", name="second")
    assert second_cb.peak_checkpoint is None and "not used" in caplog.text


def test_a_crafted_resume_checkpoint_is_refused_by_the_safe_loader(tmp_path):
    checkpoint, _ = _interrupted_checkpoint(tmp_path)
    proof = tmp_path / "pwned"
    checkpoint["extra"] = Payload(proof)
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        fit(tmp_path, DiversityEarlyStopping(dirpath=str(tmp_path / "x")), max_epochs=5,
            ckpt_path=tmp_path / "crafted.ckpt", name="second")
    assert not proof.exists()


def test_exporting_a_crafted_peak_checkpoint_refuses_it(tmp_path):
    from types import SimpleNamespace

    from aesl_lightning.modules.checkpoint_load import UnsafeCheckpointError

    proof = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": Payload(proof)}, tmp_path / "peak.ckpt")
    callback = DiversityEarlyStopping(dirpath=str(tmp_path))
    callback.peak_checkpoint = str(tmp_path / "peak.ckpt")
    module = SimpleNamespace(model=torch.nn.Linear(1, 1), export_hf=lambda out: pytest.fail("exported"))
    with pytest.raises(UnsafeCheckpointError, match="peak.ckpt: refused to load"):
        callback._export_peak(module)
    assert not proof.exists()


def test_a_sharded_model_is_not_exported_from_rank_zero_alone(tmp_path, monkeypatch, caplog):
    """The peak export runs on rank 0 only: gathering a sharded model (FSDP1 writes single-file peak
    checkpoints) there would wait forever for the other ranks, so it is skipped with a pointer to export_checkpoint."""
    from types import SimpleNamespace

    from aesl_lightning.training import early_stopping

    monkeypatch.setattr(early_stopping, "is_sharded", lambda model: True)
    peak = tmp_path / "peak.ckpt"
    peak.write_bytes(b"")
    callback = DiversityEarlyStopping(dirpath=str(tmp_path))
    callback.peak_checkpoint = str(peak)
    module = SimpleNamespace(model=torch.nn.Linear(1, 1), export_hf=lambda out: pytest.fail("exported on rank 0 alone"))
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        assert callback._export_peak(module) is None
    assert "sharded" in caplog.text and "export_checkpoint" in caplog.text
