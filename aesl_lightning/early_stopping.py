"""Diversity-aware early stopping: find the SFT "turning point" where output diversity starts to collapse.

The rule (`TurningPointRule`) is pure Python, no Lightning and no I/O. Per validation i it receives the
monitored metrics x_k(i) and computes

    D(i)   = sum_k w_k * x_k(i)                  diversity score; w_k > 0: higher x_k is more diverse
                                                 (entropy, distinct-n), w_k < 0: lower is more diverse
                                                 (self-BLEU)
    S_k(i) = smooth(x_k)(i)                      per key, over the post-warm-up finite validations:
             ema:    S(1) = x(1),  S(j) = alpha * x(j) + (1 - alpha) * S(j-1)
             window: S(j) = mean of the last `window` values (fewer at the start)
             none:   S(j) = x(j)
    S(i)   = sum_k w_k * S_k(i)                  smoothed score (= smoothing D itself: both smoothers are linear)

The first `warmup` validations are recorded but ignored. The peak is the validation with the largest S so
far (strictly larger replaces it). A validation with S < peak - min_delta is "below the peak"; the turning
point is declared when `patience` validations in a row are below the peak (one that is not, or a new peak,
resets the count), and it is the peak validation, not the one that fired. A validation where a monitored
value is missing, NaN or infinite is skipped: it is recorded, it does not touch the smoother, the peak or
the count (patience is neither reset nor advanced), so it can never fire.

`DiversityEarlyStopping` is the Lightning callback around the rule: it saves the peak checkpoint as the
peak moves, stops training when the rule fires, exports the peak in Hugging Face format and writes
`turning_point.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from aesl_lightning.fsdp import is_sharded

log = logging.getLogger("aesl_lightning")

Smoothing = Literal["ema", "window", "none"]

TURNING_POINT_FILE = "turning_point.json"
PEAK_CHECKPOINT = "peak.ckpt"
HF_MODEL_DIR = "hf_model"


def default_weight(key: str) -> float:
    """Direction of a known diversity metric: +1 when higher is more diverse, -1 when lower is.

    Keys naming an entropy or distinct-n are +1, keys naming BLEU (self-BLEU) are -1; any other key needs
    an explicit weight.
    """
    name = key.rsplit("/", 1)[-1].lower()
    if "bleu" in name:
        return -1.0
    if "entropy" in name or "distinct" in name:
        return 1.0
    raise ValueError(
        f"DiversityEarlyStopping: no default direction for monitor key {key!r}; pass `weights` (one per key: "
        "positive if higher is more diverse, negative if lower is more diverse)"
    )


def smooth(values: Sequence[float], smoothing: Smoothing = "ema", alpha: float = 0.5, window: int = 3) -> list[float]:
    """The smoothed series of `values` (see the module docstring for the equations)."""
    out: list[float] = []
    for j, x in enumerate(values):
        if smoothing == "none":
            out.append(float(x))
        elif smoothing == "ema":
            out.append(float(x) if j == 0 else alpha * float(x) + (1.0 - alpha) * out[-1])
        elif smoothing == "window":
            recent = values[max(0, j + 1 - window) : j + 1]
            out.append(sum(float(v) for v in recent) / len(recent))
        else:
            raise ValueError(f"smoothing must be 'ema', 'window' or 'none', got {smoothing!r}")
    return out


@dataclass
class TurningPointConfig:
    """Settings of the turning-point rule (the callback's arguments of the same names)."""

    monitor: str | list[str] = "val/gen_entropy"
    weights: list[float] | None = None
    smoothing: Smoothing = "ema"
    alpha: float = 0.5
    window: int = 3
    warmup: int = 0
    min_delta: float = 0.0
    patience: int = 3

    def __post_init__(self) -> None:
        keys = [self.monitor] if isinstance(self.monitor, str) else list(self.monitor)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(
                f"DiversityEarlyStopping.monitor: expected one or more distinct metric names, got {self.monitor!r}"
            )
        if self.weights is None:
            weights = [default_weight(k) for k in keys]
        else:
            weights = [float(w) for w in self.weights]
            if len(weights) != len(keys):
                raise ValueError(
                    f"DiversityEarlyStopping.weights: expected {len(keys)} weights (one per monitor key {keys}), "
                    f"got {len(weights)}"
                )
            if any(w == 0 or not math.isfinite(w) for w in weights):
                raise ValueError(
                    f"DiversityEarlyStopping.weights: expected finite non-zero numbers, got {self.weights}"
                )
        if self.smoothing not in ("ema", "window", "none"):
            raise ValueError(
                f"DiversityEarlyStopping.smoothing: expected 'ema', 'window' or 'none', got {self.smoothing!r}"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"DiversityEarlyStopping.alpha: expected a number in (0, 1], got {self.alpha}")
        if self.window < 1:
            raise ValueError(f"DiversityEarlyStopping.window: expected an integer >= 1, got {self.window}")
        if self.warmup < 0:
            raise ValueError(f"DiversityEarlyStopping.warmup: expected an integer >= 0, got {self.warmup}")
        if self.min_delta < 0:
            raise ValueError(f"DiversityEarlyStopping.min_delta: expected a number >= 0, got {self.min_delta}")
        if self.patience < 1:
            raise ValueError(f"DiversityEarlyStopping.patience: expected an integer >= 1, got {self.patience}")
        self.keys = keys
        self.resolved_weights = weights

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["monitor"], d["weights"] = list(self.keys), list(self.resolved_weights)
        return d


@dataclass
class Update:
    """What one validation did to the rule.

    `status` is "warmup", "skipped" (a missing or non-finite value), "peak" (a new peak), "below" (more than
    min_delta below the peak) or "near" (neither). `fired` is True only on the validation that declared the
    turning point (the first time the count reached `patience`).
    """

    entry: dict[str, Any]
    status: str
    new_peak: bool = False
    fired: bool = False


@dataclass
class TurningPointRule:
    """The turning-point rule as a state machine over validations; `update` once per validation.

    `history` holds one entry per validation: index, step, epoch, the raw `values`, `score` (D), the
    per-key `smoothed_values`, `score_smoothed` (S) and `status`; non-finite numbers are None. `peak` is the
    entry of the best validation so far, `turning_point` the peak entry at the moment the rule fired (None
    until then), `fired_at` the entry of the validation that fired, `wait` the current count of validations
    below the peak. The rule keeps tracking after firing (a later, higher peak moves `peak`, not
    `turning_point`). `state_dict` / `load_state_dict` carry the history; loading replays it, so a resumed
    rule is in exactly the state of an uninterrupted one.
    """

    config: TurningPointConfig = field(default_factory=TurningPointConfig)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.peak: dict[str, Any] | None = None
        self.turning_point: dict[str, Any] | None = None
        self.fired_at: dict[str, Any] | None = None
        self.wait = 0
        self._recent: dict[str, list[float]] = {k: [] for k in self.config.keys}
        self._smoothed: dict[str, float] = {}

    @property
    def fired(self) -> bool:
        return self.turning_point is not None

    def score(self, values: Mapping[str, float]) -> float:
        """D = sum_k w_k * x_k over the monitored keys (NaN if any is missing)."""
        return sum(w * float(values.get(k, math.nan)) for k, w in zip(self.config.keys, self.config.resolved_weights))

    def _smooth_next(self, key: str, x: float) -> float:
        cfg = self.config
        if cfg.smoothing == "ema" and key in self._smoothed:
            s = cfg.alpha * x + (1.0 - cfg.alpha) * self._smoothed[key]
        elif cfg.smoothing == "window":
            recent = self._recent[key]
            recent.append(x)
            del recent[: -cfg.window]
            s = sum(recent) / len(recent)
        else:
            s = x
        self._smoothed[key] = s
        return s

    def update(
        self, values: Mapping[str, float], step: int | None = None, epoch: int | None = None, **meta: Any
    ) -> Update:
        """Feed one validation's metrics (a mapping that holds at least the monitored keys); `step`, `epoch`
        and any other (JSON-able) `meta` are stored in its history entry."""
        cfg = self.config
        raw = {k: _finite_or_none(values.get(k)) for k in cfg.keys}
        score = self.score({k: math.nan if v is None else v for k, v in raw.items()})
        entry: dict[str, Any] = {
            "index": len(self.history),
            "step": step,
            "epoch": epoch,
            **meta,
            "values": raw,
            "score": _finite_or_none(score),
            "smoothed_values": None,
            "score_smoothed": None,
        }
        self.history.append(entry)
        if entry["index"] < cfg.warmup:
            entry["status"] = "warmup"
            return Update(entry, "warmup")
        if entry["score"] is None:
            entry["status"] = "skipped"
            return Update(entry, "skipped")

        smoothed = {k: self._smooth_next(k, raw[k]) for k in cfg.keys}
        s = sum(w * smoothed[k] for k, w in zip(cfg.keys, cfg.resolved_weights))
        entry["smoothed_values"], entry["score_smoothed"] = smoothed, s

        if self.peak is None or s > self.peak["score_smoothed"]:
            self.peak, self.wait = entry, 0
            entry["status"] = "peak"
            return Update(entry, "peak", new_peak=True)
        if s < self.peak["score_smoothed"] - cfg.min_delta:
            self.wait += 1
            entry["status"] = "below"
        else:
            self.wait = 0
            entry["status"] = "near"
        fired = self.turning_point is None and self.wait >= cfg.patience
        if fired:
            self.turning_point, self.fired_at = self.peak, entry
        return Update(entry, entry["status"], fired=fired)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "updates": [{k: v for k, v in e.items() if k not in _DERIVED} for e in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("config") != self.config.to_dict():
            log.warning(
                "DiversityEarlyStopping: the rule's settings differ from the checkpoint's (%s, now %s); "
                "the saved history is replayed under the current settings",
                state.get("config"),
                self.config.to_dict(),
            )
        self.reset()
        for update in state["updates"]:
            update = dict(update)
            values = {k: math.nan if v is None else v for k, v in update.pop("values").items()}
            self.update(values, **update)


_DERIVED = ("index", "score", "smoothed_values", "score_smoothed", "status")


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x.item() if isinstance(x, torch.Tensor) else x)
    return x if math.isfinite(x) else None


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
    # The step Lightning's loggers put validation metrics at (one behind global_step during validation).
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
            None = +1 for entropy and distinct-n keys, -1 for self-BLEU keys.
        smoothing: How D is smoothed over validations: ema, window (moving average) or none.
        alpha: EMA weight of the newest value (1 = no smoothing).
        window: Moving-average length in validations.
        warmup: Number of first validations to ignore.
        min_delta: A validation counts as a fall only if smoothed D is more than this below the peak.
        patience: Consecutive falls below the peak that declare the turning point.
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
        stop: bool = True,
        dirpath: str | None = None,
        export_hf: bool = True,
        save_weights_only: bool = False,
    ) -> None:
        self.rule = TurningPointRule(
            TurningPointConfig(monitor, weights, smoothing, alpha, window, warmup, min_delta, patience)
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
        from aesl_lightning.callbacks import run_dir

        out = str(Path(self.dirpath) if self.dirpath else run_dir(trainer) / "turning_point")
        self._out = Path(trainer.strategy.broadcast(out))  # loggers may resolve their version per rank
        self._run_dir = Path(trainer.strategy.broadcast(str(run_dir(trainer))))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
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
        if trainer.state.fn == "fit" and self.rule.history:
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
        if self.rule.peak is not None and self.peak_checkpoint is None:
            self._adopt_peak(trainer)

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
            f"{self.rule.config.patience} validations more than {self.rule.config.min_delta} below the peak."
        )
        log.info(note)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("diversity/turning_point", note, global_step=fired["log_step"])

    def _save_peak(self, trainer: L.Trainer) -> None:
        final = self.out_dir / PEAK_CHECKPOINT
        tmp = self.out_dir / f".{PEAK_CHECKPOINT}.tmp"
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("DiversityEarlyStopping.save_peak")
        trainer.save_checkpoint(tmp, weights_only=self.save_weights_only)  # collective; rank 0 writes
        if trainer.is_global_zero:
            if final.is_dir():  # a sharded (distributed) checkpoint is a folder, which os.replace cannot overwrite
                shutil.rmtree(final)
            os.replace(tmp, final)
        trainer.strategy.barrier("DiversityEarlyStopping.save_peak")
        self.peak_checkpoint = str(final.resolve())
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
                "(aesl_lightning.lm.export_checkpoint on a single-file checkpoint)",
                path,
            )
            return None
        if not hasattr(pl_module, "export_hf"):
            log.warning("DiversityEarlyStopping: %s has no export_hf(); nothing exported", type(pl_module).__name__)
            return None
        if is_sharded(getattr(pl_module, "model", pl_module)):
            # gathering the shards is collective, but this runs on rank 0 only
            log.warning("DiversityEarlyStopping: the model is sharded; export %s with aesl_lightning.lm.export_checkpoint",
                        path)
            return None
        from aesl_lightning.lm import load_checkpoint

        peak_state = load_checkpoint(path)["state_dict"]  # weights_only=True: a crafted file cannot run code
        # The module may keep training (stop=False) or be exported again by another callback: load the
        # peak into it only for the export and put the current weights back.
        current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        try:
            pl_module.load_state_dict(peak_state)
            return pl_module.export_hf(self.out_dir / HF_MODEL_DIR)
        finally:
            pl_module.load_state_dict(current)

    def summary(self) -> dict[str, Any]:
        """The content of turning_point.json."""
        rule = self.rule
        return {
            "turning_point_detected": rule.fired,
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
        if path is None:
            return None
        try:
            return Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _portable(self, path: str | None) -> str | None:
        """`path` relative to the run folder if it lies inside it (the default layout), else as is."""
        if path is None or self._run_dir is None:
            return path
        try:
            return Path(path).resolve().relative_to(self._run_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _adopt_peak(self, trainer: L.Trainer) -> None:
        """After resuming: make `<dirpath>/peak.ckpt` this run's own copy of the recorded peak.

        The peak is this run's existing `peak.ckpt` if it holds the recorded peak step, else the file the
        resumed checkpoint recorded, followed only if it lies inside the resumed checkpoint's folder or the one
        above it (the run folder of `<run>/checkpoints/last.ckpt`) and holds the peak's global step when read
        with `torch.load(weights_only=True)`. Anything else is refused with a warning: the peak is then known
        (history, turning point) but has no checkpoint until a new peak is saved.
        """
        want = self.rule.peak["step"]
        own = self.out_dir / PEAK_CHECKPOINT
        adopted = None
        if trainer.is_global_zero:
            adopted = self._find_peak(own, want)
            if adopted is not None and adopted != own:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.out_dir / f".{PEAK_CHECKPOINT}.tmp"
                shutil.copyfile(adopted, tmp)
                os.replace(tmp, own)
                log.info("DiversityEarlyStopping: copied the peak checkpoint (step %s) of the resumed run from %s to %s",
                         want, adopted, own)
            adopted = str(own.resolve()) if adopted is not None else None
        self.peak_checkpoint = trainer.strategy.broadcast(adopted)

    def _find_peak(self, own: Path, want: int) -> Path | None:
        if self._holds_step(own, want):
            return own
        if not self._restored_peaks or self._resumed_from is None:
            log.warning("DiversityEarlyStopping: the resumed run's peak (step %s) has no checkpoint here; it is "
                        "exported only if a new peak is found", want)
            return None
        ckpt = Path(self._resumed_from).resolve()
        roots = [ckpt.parent, ckpt.parent.parent]
        from aesl_lightning.callbacks import is_inside
        from aesl_lightning.export import clean_stale_exports

        for recorded in self._restored_peaks:
            relative = not Path(recorded).is_absolute()
            for root in roots:
                candidate = root / recorded if relative else Path(recorded)
                if is_inside(candidate, root) and candidate.is_file() and self._holds_step(candidate, want):
                    clean_stale_exports(candidate.parent / HF_MODEL_DIR)  # a killed export of that run's peak
                    return candidate
        log.warning(
            "DiversityEarlyStopping: the resumed checkpoint records the peak (step %s) at %s; not used: no file "
            "holding that step inside %s or %s (a checkpoint is never followed outside its own run folder). The "
            "peak is exported only if a new peak is found", want, " and ".join(map(repr, self._restored_peaks)),
            roots[0], roots[1]
        )
        return None

    @staticmethod
    def _holds_step(path: Path, want: int) -> bool:
        if not path.is_file():
            return False
        from aesl_lightning.lm import UnsafeCheckpointError, load_checkpoint

        try:
            return load_checkpoint(path).get("global_step") == want
        except UnsafeCheckpointError as err:
            log.warning("DiversityEarlyStopping: %s", err)
            return False

    def _write_json(self, trainer: L.Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        final = self.out_dir / TURNING_POINT_FILE
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2) + "\n")
        os.replace(tmp, final)
