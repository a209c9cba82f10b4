"""DiversityEarlyStopping: the Lightning callback around the turning-point rule (`aesl_lightning.maths.turning_point`).

It feeds the rule the monitored validation metrics, saves the peak checkpoint as the peak moves, stops training
when the rule fires (or, with `stop=False`, only selects), exports the peak in Hugging Face format and writes
`turning_point.json`. The rule's equations are in `aesl_lightning.maths.turning_point`; how the peak's files are written,
read and followed after resuming in `aesl_lightning.training.peak_checkpoint`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from aesl_lightning.infra.fsdp import is_sharded
from aesl_lightning.training.peak_checkpoint import HF_MODEL_DIR, PEAK_CHECKPOINT, TURNING_POINT_FILE, copy_peak, export_weights, find_peak, save_peak, write_json
from aesl_lightning.maths.turning_point import Smoothing, TurningPointConfig, TurningPointRule, Update, default_weight, explain, smooth  # noqa: F401

log = logging.getLogger("aesl_lightning")


# ----------------------------------------------------------------------------------------------------
# Lightning callback


def _logged_this_validation(trainer: L.Trainer) -> set[str] | None:
    """Names logged during the validation that is ending, or None if Lightning's internals are not as expected.

    `callback_metrics` keeps a metric's last value; a metric computed only every n-th validation would be
    read again, stale, in between. Lightning's result collection marks the entries not logged this time.
    """
    try:
        return {result.meta.name for result in trainer._results.values() if not result.has_reset}
    except AttributeError:
        return None


def _log_step(trainer: L.Trainer) -> int:
    # The step Lightning's loggers put validation metrics at: a "step" logged at this validation (as
    # ValidationSchedule does), else the count of stepped batches (one behind global_step during validation).
    logged = _logged_this_validation(trainer)
    if "step" in trainer.callback_metrics and (logged is None or "step" in logged):
        return int(trainer.callback_metrics["step"])
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class DiversityEarlyStopping(Callback):
    """Stop SFT at the diversity turning point and keep (and export) the checkpoint of the peak.

    After every validation the monitored metrics are read from `trainer.callback_metrics`, which is why
    this runs in `on_validation_end` (callbacks' `on_validation_epoch_end` runs before the module's, where
    the metrics are logged). Under DDP log the monitored metrics with `sync_dist=True`; rank 0's values are
    broadcast anyway, so every rank takes the same decision. Files are written by global rank 0 only.
    A validation where a monitored metric was not logged (e.g. generation every n-th validation only), or
    is NaN/inf, is skipped: recorded, but it neither counts towards nor resets `patience`.
    Files in `dirpath`: `peak.ckpt` (a Lightning checkpoint of the best validation so far, replaced
    atomically at each new peak), `hf_model/` (the peak in Hugging Face format, written when the turning
    point stops training, else at the end of fit) and `turning_point.json` (`summary()`: the turning point,
    the peak, the rule's settings and the history). TensorBoard gets `diversity/score`,
    `diversity/score_smoothed`, once `diversity/turning_point_step` and a text note. In the JSON `step` is
    `trainer.global_step` (the checkpoint's), `log_step` the step the loggers put that validation's
    metrics at (one less, during fit), which is also the value of `diversity/turning_point_step`; its
    `peak_checkpoint` and `hf_model` are relative to the JSON's own folder.
    Resuming: the checkpoint's state holds the peak's path relative to the run folder; the resumed run copies
    that peak into its own `dirpath` (see `_adopt_peak`: only from beside the resumed checkpoint, and read
    with `torch.load(weights_only=True)` like every checkpoint this callback reads).

    Args:
        monitor: Metric (or list of metrics) that measures diversity, as logged by the module.
        weights: One signed weight per monitor key, D = sum w_k x_k (negative: lower is more diverse);
            None = +1 for entropy, distinct-n / distinct-answer and pass_gap keys, -1 for self-BLEU keys.
        smoothing: How D is smoothed over validations: ema, window (moving average) or none.
        alpha: EMA weight of the newest value (1 = no smoothing).
        window: Moving-average length in validations.
        warmup: Number of first validations to ignore.
        min_delta: A validation counts as a fall only if smoothed D is more than this below the peak (the
            smallest margin).
        patience: Consecutive falls below the peak that declare the turning point.
        format_key: Format rate to wait for (e.g. val/boxed_rate): validations count only once it has reached
            `format_level`; None = no gate.
        format_level: The format rate at which the rule starts considering validations.
        noise_k: Noise margin: a fall must exceed noise_k x the standard error of (peak - this validation),
            from the logged standard errors over prompts; 0 = only min_delta.
        noise_keys: The standard error of each monitor key; None = `<key>_se`.
        stop: Stop training at the turning point; False only selects (and exports) the peak checkpoint.
        dirpath: Folder for peak.ckpt, hf_model and turning_point.json; None = `<run dir>/turning_point`.
        export_hf: Export the peak checkpoint in Hugging Face format to `<dirpath>/hf_model`.
        save_weights_only: Save only the weights in peak.ckpt (no optimizer state; cannot be resumed).
    """

    def __init__(
        self,
        monitor: str | list[str] = "val/gen_entropy",
        weights: list[float] | None = None,
        smoothing: Smoothing = "ema",
        alpha: float = 0.5,
        window: int = 3,
        warmup: int = 0,
        min_delta: float = 0.0,
        patience: int = 3,
        format_key: str | None = None,
        format_level: float = 0.9,
        noise_k: float = 0.0,
        noise_keys: list[str] | None = None,
        stop: bool = True,
        dirpath: str | None = None,
        export_hf: bool = True,
        save_weights_only: bool = False,
    ) -> None:
        self.rule = TurningPointRule(
            TurningPointConfig(monitor, weights, smoothing, alpha, window, warmup, min_delta, patience, format_key,
                               format_level, noise_k, noise_keys)
        )
        self.stop = stop
        self.dirpath = dirpath
        self.export_hf = export_hf
        self.save_weights_only = save_weights_only
        self.peak_checkpoint: str | None = None  # set only by this run: a peak it saved or adopted, never a loaded path
        self.exported: Path | None = None
        self.stopped_at_step: int | None = None
        self._out: Path | None = None
        self._run_dir: Path | None = None
        self._restored_peaks: list[str] = []  # the peak paths a resumed checkpoint records (not trusted as is)
        self._resumed_from: str | None = None
        self._exported_index: int | None = None
        self._warned: set[str] = set()
        self._resumed_finished = False  # resumed from a run that had stopped: no training, no validation, no new files

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.rule.config.keys, weights=self.rule.config.resolved_weights)

    @property
    def out_dir(self) -> Path:
        """The resolved `dirpath` (known from `setup` on)."""
        if self._out is None:
            raise RuntimeError("DiversityEarlyStopping.out_dir is known only once the Trainer has called setup")
        return self._out

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from aesl_lightning.training.callbacks import run_dir

        out = str(Path(self.dirpath) if self.dirpath else run_dir(trainer) / "turning_point")
        self._out = Path(trainer.strategy.broadcast(out))  # loggers may resolve their version per rank
        self._run_dir = Path(trainer.strategy.broadcast(str(run_dir(trainer))))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._resumed_finished:
            return
        logged = _logged_this_validation(trainer)
        values, unusable = {}, {}
        for key in self.rule.config.keys:
            value = trainer.callback_metrics.get(key)
            if value is None:
                unusable[key] = "missing"
            elif logged is not None and key not in logged:
                unusable[key] = "stale"
            else:
                values[key] = float(value)
                if not math.isfinite(values[key]):
                    unusable[key] = "non-finite"
        for key in self.rule.config.read()[len(self.rule.config.keys):]:  # standard errors, format rate: optional
            value = trainer.callback_metrics.get(key)
            if value is not None and (logged is None or key in logged):
                values[key] = float(value)
            elif value is None and key not in self._warned and trainer.is_global_zero:
                # a misspelt format key would keep the gate shut, a missing standard error the margin at min_delta
                log.warning("DiversityEarlyStopping: %s is not logged by the module (%s)", key,
                            "the format gate stays closed" if key == self.rule.config.format_key else
                            "the noise margin counts it as 0")
                self._warned.add(key)
        values, unusable = trainer.strategy.broadcast((values, unusable), src=0)
        if unusable and trainer.is_global_zero:
            self._warn_unusable(trainer, values, unusable)

        update = self.rule.update(
            values, step=trainer.global_step, epoch=trainer.current_epoch, log_step=_log_step(trainer)
        )
        self._log_scores(trainer, update)
        if update.new_peak:
            self._save_peak(trainer)
        if update.fired:
            self._log_turning_point(trainer)
        if self.stop and self.rule.fired:  # also when resuming a run that had already passed its turning point
            trainer.should_stop = True
            if update.fired:
                self.stopped_at_step = trainer.global_step
                self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or not self.rule.history:
            return
        if self._resumed_finished and self._json_records_stop():
            return  # nothing new since the run that stopped wrote its files (a kill before that rewrites them)
        self._finish(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The rule's history, where the peak checkpoint is (relative to the run folder when it lies inside it,
        as by default), and the stop step."""
        return {
            "rule": self.rule.state_dict(),
            "peak_checkpoint": self._portable(self.peak_checkpoint),
            "peak_checkpoint_absolute": self.peak_checkpoint,
            "stopped_at_step": self.stopped_at_step,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replay the rule's history. The recorded peak path is not used as is: `on_train_start` looks for it
        only next to the resumed checkpoint and copies it into this run's folder (`_adopt_peak`)."""
        self.rule.load_state_dict(state_dict["rule"])
        recorded = [state_dict.get("peak_checkpoint"), state_dict.get("peak_checkpoint_absolute")]
        self._restored_peaks = list(dict.fromkeys(p for p in recorded if isinstance(p, str) and p))
        self.stopped_at_step = state_dict.get("stopped_at_step")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After resuming: adopt the recorded peak; and if the resumed run had already stopped at its turning point
        (`stop=True`), stop again before any training step or validation: the resumed finished run is a no-op."""
        if self.rule.peak is not None and self.peak_checkpoint is None:
            self._adopt_peak(trainer)
        if self.stop and self.rule.fired and self._resumed_from is not None:
            self._resumed_finished = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.warning(
                    "DiversityEarlyStopping: %s is from a run that already stopped at its turning point (declared at "
                    "step %s, peak at step %s); nothing more to train. Resume with DiversityEarlyStopping(stop=False) "
                    "or drop the callback to train past it", self._resumed_from, self.rule.fired_at["step"],
                    self.rule.peak["step"] if self.rule.peak is not None else None,
                )

    def _json_records_stop(self) -> bool:
        """Whether `turning_point.json` in `dirpath` already holds this run's decision and whole history."""
        import json

        try:
            written = json.loads((self.out_dir / TURNING_POINT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return written.get("stopped_at_step") == self.stopped_at_step and written.get("history") == self.rule.history

    # ---------------------------------------------------------------------------------------- helpers
    def _warn_unusable(self, trainer: L.Trainer, values: dict[str, float], unusable: dict[str, str]) -> None:
        where = f"DiversityEarlyStopping: validation {len(self.rule.history)} (step {trainer.global_step}) skipped"
        missing = [k for k, why in unusable.items() if why == "missing"]
        stale = [k for k, why in unusable.items() if why == "stale"]
        bad = {k: values[k] for k, why in unusable.items() if why == "non-finite"}
        if missing and "missing" not in self._warned:
            available = sorted(k for k in trainer.callback_metrics if k.startswith("val"))
            log.warning("%s: %s not logged by the module (validation metrics: %s)", where, missing, available)
            self._warned.add("missing")
        if stale and not missing and "stale" not in self._warned:
            log.warning(
                "%s: %s not logged at this validation (e.g. val_generation.every_n_validations > 1); validations "
                "without it are skipped and do not count towards patience (said once)", where, stale
            )
            self._warned.add("stale")
        if bad:
            log.warning("%s: non-finite %s; patience unchanged", where, bad)

    def _log_scores(self, trainer: L.Trainer, update: Update) -> None:
        metrics = {}
        if update.entry["score"] is not None:
            metrics["diversity/score"] = update.entry["score"]
        if update.entry["score_smoothed"] is not None:
            metrics["diversity/score_smoothed"] = update.entry["score_smoothed"]
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=update.entry["log_step"])

    def _log_turning_point(self, trainer: L.Trainer) -> None:
        peak, fired = self.rule.turning_point, self.rule.fired_at
        for logger in trainer.loggers:
            logger.log_metrics({"diversity/turning_point_step": float(peak["log_step"])}, step=fired["log_step"])
        if not trainer.is_global_zero:
            return
        values = ", ".join(f"{k} = {v:.4g}" for k, v in peak["values"].items())
        note = (
            f"Diversity turning point at global step {peak['step']} (TensorBoard step {peak['log_step']}, "
            f"validation {peak['index']}, epoch {peak['epoch']}): "
            f"{values}; smoothed score {peak['score_smoothed']:.4g}. Declared at step {fired['step']} after "
            f"{self.rule.config.patience} validations more than the margin ({fired['margin']:.3g}) below the peak."
        )
        log.info(note)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("diversity/turning_point", note, global_step=fired["log_step"])

    def _save_peak(self, trainer: L.Trainer) -> None:
        self.peak_checkpoint = str(save_peak(trainer, self.out_dir, weights_only=self.save_weights_only))
        model = getattr(trainer.lightning_module, "model", None)
        if self.export_hf and model is not None and is_sharded(model) and hasattr(trainer.lightning_module, "export_hf"):
            # A sharded checkpoint cannot be exported by rank 0 alone later: export the peak now, from the live
            # weights (gathering is collective: every rank calls, rank 0 writes), replacing the previous peak's export.
            self.exported = trainer.lightning_module.export_hf(self.out_dir / HF_MODEL_DIR)
            self._exported_index = self.rule.peak["index"] if self.rule.peak is not None else None

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export the peak (once per peak) and write turning_point.json, on rank 0."""
        peak = self.rule.peak
        if trainer.is_global_zero:
            if self.export_hf and peak is not None and self._exported_index != peak["index"]:
                self.exported = self._export_peak(pl_module)
                self._exported_index = peak["index"]
            self._write_json(trainer)
        trainer.strategy.barrier("DiversityEarlyStopping.finish")

    def _export_peak(self, pl_module: L.LightningModule) -> Path | None:
        path = Path(self.peak_checkpoint) if self.peak_checkpoint else None
        if path is None or not path.exists():
            log.warning("DiversityEarlyStopping: no peak checkpoint at %s; nothing exported", path)
            return None
        if path.is_dir():
            log.warning(
                "DiversityEarlyStopping: %s is a sharded checkpoint; export it after consolidating "
                "(aesl_lightning.modules.lm.export_checkpoint on a single-file checkpoint)",
                path,
            )
            return None
        if not hasattr(pl_module, "export_hf"):
            log.warning("DiversityEarlyStopping: %s has no export_hf(); nothing exported", type(pl_module).__name__)
            return None
        if is_sharded(getattr(pl_module, "model", pl_module)):
            # gathering the shards is collective, but this runs on rank 0 only
            log.warning("DiversityEarlyStopping: the model is sharded; export %s with aesl_lightning.modules.lm.export_checkpoint",
                        path)
            return None
        from aesl_lightning.modules.checkpoint_load import load_checkpoint

        peak_state = load_checkpoint(path)["state_dict"]  # weights_only=True: a crafted file cannot run code
        return export_weights(pl_module, peak_state, self.out_dir / HF_MODEL_DIR)

    def summary(self) -> dict[str, Any]:
        """The content of turning_point.json."""
        rule = self.rule
        return {
            "turning_point_detected": rule.fired,
            "verdict": explain(rule),
            "stopped": self.stopped_at_step is not None,
            "stopped_at_step": self.stopped_at_step,
            "turning_point": rule.turning_point,
            "fired_at": None if rule.fired_at is None else {k: rule.fired_at[k] for k in ("index", "step", "epoch")},
            "peak": rule.peak,
            "peak_checkpoint": self._relative_to_out(self.peak_checkpoint),
            "hf_model": self._relative_to_out(self.exported),
            "rule": rule.config.to_dict(),
            "history": rule.history,
        }

    def _relative_to_out(self, path: str | Path | None) -> str | None:
        return _relative(path, self.out_dir)

    def _portable(self, path: str | None) -> str | None:
        """`path` relative to the run folder if it lies inside it (the default layout), else as is."""
        return _relative(path, self._run_dir)

    def _adopt_peak(self, trainer: L.Trainer) -> None:
        """After resuming: make `<dirpath>/peak.ckpt` this run's own copy of the recorded peak.

        The peak is this run's existing `peak.ckpt` if it holds the recorded peak step, else the file the
        resumed checkpoint recorded, followed only if it lies inside the resumed checkpoint's folder or the one
        above it (the run folder of `<run>/checkpoints/last.ckpt`) and holds the peak's global step when read
        with `torch.load(weights_only=True)` (`peak_checkpoint.find_peak`). Anything else is refused with a
        warning: the peak is then known (history, turning point) but has no checkpoint until a new peak is saved.
        """
        want = self.rule.peak["step"]
        own = self.out_dir / PEAK_CHECKPOINT
        adopted = None
        if trainer.is_global_zero:
            adopted = find_peak(want, own=own, recorded=self._restored_peaks, resumed_from=self._resumed_from)
            if adopted is not None and adopted != own:
                copy_peak(adopted, own)
                log.info("DiversityEarlyStopping: copied the peak checkpoint (step %s) of the resumed run from %s to %s",
                         want, adopted, own)
            adopted = str(own.resolve()) if adopted is not None else None
        self.peak_checkpoint = trainer.strategy.broadcast(adopted)

    def _write_json(self, trainer: L.Trainer) -> None:
        write_json(self.out_dir / TURNING_POINT_FILE, self.summary())


def _relative(path: str | Path | None, root: Path | None) -> str | None:
    """`path` relative to `root` as a POSIX string if it lies inside it, else as is."""
    if path is None or root is None:
        return None if path is None else str(path)
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
