"""The SFT "turning point" rule: where output diversity starts to collapse. Pure Python, no Lightning, no I/O.

`TurningPointRule`: per validation i it receives the monitored metrics x_k(i) and computes

    D(i)   = sum_k w_k * x_k(i)                  diversity score; w_k > 0: higher x_k is more diverse
                                                 (entropy, distinct-n), w_k < 0: lower is more diverse
                                                 (self-BLEU)
    S_k(i) = smooth(x_k)(i)                      per key, over the post-warm-up finite validations:
             ema:    S(1) = x(1),  S(j) = alpha * x(j) + (1 - alpha) * S(j-1)
             window: S(j) = mean of the last `window` values (fewer at the start)
             none:   S(j) = x(j)
    S(i)   = sum_k w_k * S_k(i)                  smoothed score (= smoothing D itself: both smoothers are linear)

The first `warmup` validations are recorded but ignored. Format gate (optional, `format_key` set): a
validation is considered only once the monitored format rate F (e.g. the share of samples with a final
`\\boxed{}` answer) has reached `format_level`; before that it is recorded with status "format" and touches
nothing (the gate stays open once F has reached the level). A base model's free prose scores far higher on
entropy than any fine-tuned template, so without the gate the "peak" sits at step 0: a format change, not
the over-fitting the turning point is about.

Noise margin (optional, `noise_k > 0`): each validation i carries the standard error of its score,

    sigma(i) = sqrt( sum_k (w_k * se_k(i))^2 )   se_k = the standard error of x_k over prompts (the logged
                                                 `<key>_se`); exact for one key, for several it treats the
                                                 keys' errors as independent
    margin(i) = max( min_delta, noise_k * sqrt(sigma(peak)^2 + sigma(i)^2) )

(the standard error of the difference between two independent validations, times `noise_k`; a missing
sigma counts as 0, so with none logged the margin is min_delta). The peak is the validation with the
largest S so far (strictly larger replaces it). A validation with S < S(peak) - margin(i) is "below the
peak"; the turning point is declared when `patience` validations in a row are below the peak (one that is
not, or a new peak, resets the count), and it is the peak validation, not the one that fired. A validation
where a monitored value is missing, NaN or infinite is skipped: it is recorded, it does not touch the
smoother, the peak or the count (patience is neither reset nor advanced), so it can never fire.

`find_turning_point(steps, scores, noise, format_rates, ...)` runs the same rule on recorded curves
(no Lightning, no metric names) and says why it found a turning point or none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

log = logging.getLogger("aesl_lightning")

Smoothing = Literal["ema", "window", "none"]


def default_weight(key: str) -> float:
    """Direction of a known diversity metric: +1 when higher is more diverse, -1 when lower is.

    Keys naming an entropy, distinct-n, distinct answers or pass_gap are +1, keys naming BLEU (self-BLEU)
    are -1; any other key needs an explicit weight.
    """
    name = key.rsplit("/", 1)[-1].lower()
    if "bleu" in name:
        return -1.0
    if "entropy" in name or "distinct" in name or "pass_gap" in name:
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
    format_key: str | None = None
    format_level: float = 0.9
    noise_k: float = 0.0
    noise_keys: list[str] | None = None

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
        for name, ok, expected in (
            ("alpha", 0.0 < self.alpha <= 1.0, "a number in (0, 1]"), ("window", self.window >= 1, "an integer >= 1"),
            ("warmup", self.warmup >= 0, "an integer >= 0"), ("min_delta", self.min_delta >= 0, "a number >= 0"),
            ("patience", self.patience >= 1, "an integer >= 1"),
            ("format_level", 0.0 <= self.format_level <= 1.0, "a rate in [0, 1]"),
            ("noise_k", 0.0 <= self.noise_k < math.inf, "a finite number >= 0"),
        ):
            if not ok:
                raise ValueError(f"DiversityEarlyStopping.{name}: expected {expected}, got {getattr(self, name)}")
        noise_keys = [f"{k}_se" for k in keys] if self.noise_keys is None else list(self.noise_keys)
        if len(noise_keys) != len(keys):
            raise ValueError(
                f"DiversityEarlyStopping.noise_keys: expected {len(keys)} names (the standard error of each monitor key "
                f"{keys}), got {len(noise_keys)}"
            )
        self.keys = keys
        self.resolved_weights = weights
        self.resolved_noise_keys = noise_keys

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["monitor"], d["weights"] = list(self.keys), list(self.resolved_weights)
        d["noise_keys"] = list(self.resolved_noise_keys)
        return d

    def read(self) -> list[str]:
        """Every metric name the rule reads: the monitored keys, then (when used) their standard errors and the
        format rate."""
        names = list(self.keys) + (list(self.resolved_noise_keys) if self.noise_k > 0 else [])
        return names + ([self.format_key] if self.format_key else [])


@dataclass
class Update:
    """What one validation did to the rule.

    `status` is "warmup", "format" (the format rate has not reached `format_level` yet), "skipped" (a missing
    or non-finite value), "peak" (a new peak), "below" (more than the margin below the peak) or "near"
    (neither). `fired` is True only on the validation that declared the turning point (the first time the
    count reached `patience`).
    """

    entry: dict[str, Any]
    status: str
    new_peak: bool = False
    fired: bool = False


@dataclass
class TurningPointRule:
    """The turning-point rule as a state machine over validations; `update` once per validation.

    `history` holds one entry per validation: index, step, epoch, the raw `values`, `score` (D), `noise`
    (sigma), `format_rate` (F), the per-key `smoothed_values`, `score_smoothed` (S), `margin` (of a validation
    compared with the peak) and `status`; non-finite numbers are None. `format_open`: the format gate has
    opened. `peak` is the entry of the best validation so far, `turning_point` the peak entry at the moment
    the rule fired (None until then), `fired_at` the entry of the validation that fired, `wait` the current
    count of validations below the peak. The rule keeps tracking after firing (a later, higher peak moves
    `peak`, not `turning_point`). `state_dict` / `load_state_dict` carry the history; loading replays it,
    so a resumed rule is in exactly the state of an uninterrupted one.
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
        self.format_open = self.config.format_key is None
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
        raw = {k: _finite_or_none(values.get(k)) for k in cfg.read()}
        score = self.score({k: math.nan if raw[k] is None else raw[k] for k in cfg.keys})
        entry: dict[str, Any] = {
            "index": len(self.history),
            "step": step,
            "epoch": epoch,
            **meta,
            "values": raw,
            "score": _finite_or_none(score),
            "noise": self._noise(raw),
            "format_rate": raw.get(cfg.format_key) if cfg.format_key else None,
            "smoothed_values": None,
            "score_smoothed": None,
            "margin": None,
        }
        self.history.append(entry)
        if entry["index"] < cfg.warmup:
            entry["status"] = "warmup"
            return Update(entry, "warmup")
        if not self.format_open:
            rate = entry["format_rate"]
            if rate is None or rate < cfg.format_level:
                entry["status"] = "format"
                return Update(entry, "format")
            self.format_open = True
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
        entry["margin"] = self.margin(self.peak, entry)
        if s < self.peak["score_smoothed"] - entry["margin"]:
            self.wait += 1
            entry["status"] = "below"
        else:
            self.wait = 0
            entry["status"] = "near"
        fired = self.turning_point is None and self.wait >= cfg.patience
        if fired:
            self.turning_point, self.fired_at = self.peak, entry
        return Update(entry, entry["status"], fired=fired)

    def _noise(self, raw: Mapping[str, float | None]) -> float | None:
        """sigma = sqrt(sum_k (w_k se_k)^2), None when the margin is off or a standard error is missing."""
        cfg = self.config
        if cfg.noise_k <= 0:
            return None
        se = [raw.get(k) for k in cfg.resolved_noise_keys]
        if any(v is None for v in se):
            return None
        return math.sqrt(math.fsum((w * v) ** 2 for w, v in zip(cfg.resolved_weights, se)))

    def margin(self, peak: Mapping[str, Any], entry: Mapping[str, Any]) -> float:
        """max(min_delta, noise_k * sqrt(sigma(peak)^2 + sigma(entry)^2)); a missing sigma counts as 0."""
        cfg = self.config
        spread = math.hypot(peak.get("noise") or 0.0, entry.get("noise") or 0.0)
        return max(cfg.min_delta, cfg.noise_k * spread)

    def state_dict(self) -> dict[str, Any]:
        updates = [{k: v for k, v in e.items() if k not in _DERIVED} for e in self.history]
        return {"config": self.config.to_dict(), "updates": updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("config") != self.config.to_dict():
            log.warning("DiversityEarlyStopping: the rule's settings differ from the checkpoint's (%s, now %s); the "
                        "saved history is replayed under the current settings", state.get("config"), self.config.to_dict())
        self.reset()
        for update in state["updates"]:
            update = dict(update)
            values = {k: math.nan if v is None else v for k, v in update.pop("values").items()}
            self.update(values, **update)


def explain(rule: TurningPointRule) -> str:
    """One line on what the rule found: the turning point and why, or why there is none (yet)."""
    cfg, history = rule.config, rule.history
    considered = [e for e in history if e.get("score_smoothed") is not None]
    if rule.turning_point is not None:
        peak, fired = rule.turning_point, rule.fired_at
        text = (f"turning point at step {peak['step']} (smoothed score {peak['score_smoothed']:.4g}), declared at step "
                f"{fired['step']} after {cfg.patience} validation(s) more than the margin ({fired['margin']:.3g}) below it")
        if considered and considered[0] is peak:
            text += ("; it is the first validation the rule considered, a boundary: the curve may have peaked before"
                     + (" the format was learned" if cfg.format_key else " it"))
        return text
    last = history[-1]["step"] if history else None
    if cfg.format_key and not rule.format_open:
        rates = [e["format_rate"] for e in history if e.get("format_rate") is not None]
        highest = f"highest {max(rates):.3g}" if rates else "never logged"
        return (f"no turning point within {last} steps: the format rate {cfg.format_key} never reached "
                f"{cfg.format_level} ({highest}), so no validation was considered")
    if rule.peak is None:
        return f"no turning point within {last} steps: no usable validation"
    return (f"no turning point within {last} steps: the peak at step {rule.peak['step']} has not been followed by "
            f"{cfg.patience} validation(s) in a row more than the margin below it ({rule.wait} so far)")


@dataclass
class TurningPointResult:
    """What `find_turning_point` found: the step of the turning point (None if there is none), its position
    in the inputs, the reason in words, and the rule's per-validation history."""

    step: int | None
    index: int | None
    reason: str
    history: list[dict[str, Any]]


def find_turning_point(
    steps: Sequence[int],
    scores: Sequence[float],
    noise: Sequence[float | None] | None = None,
    format_rates: Sequence[float | None] | None = None,
    *,
    format_level: float = 0.9,
    noise_k: float = 0.0,
    min_delta: float = 0.0,
    patience: int = 3,
    smoothing: Smoothing = "ema",
    alpha: float = 0.5,
    window: int = 3,
    warmup: int = 0,
) -> TurningPointResult:
    """The turning-point rule (module docstring) on a recorded curve, outside Lightning.

    `scores[i]` is the diversity score D of the validation at `steps[i]` (higher = more diverse; combine
    signed metrics first), `noise[i]` its standard error sigma (or a bootstrap SD over prompts; None where
    unknown), `format_rates[i]` the format rate F (None: no format gate). The keyword options are the callback's
    (`DiversityEarlyStopping`) of the same names. Returns the turning step (the peak's) or None, and why.
    """
    n = len(steps)
    for name, seq in (("scores", scores), ("noise", noise), ("format_rates", format_rates)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"find_turning_point: {name} has {len(seq)} values, steps has {n}")
    config = TurningPointConfig(
        monitor="score", weights=[1.0], smoothing=smoothing, alpha=alpha, window=window, warmup=warmup,
        min_delta=min_delta, patience=patience, format_key=None if format_rates is None else "format_rate",
        format_level=format_level, noise_k=noise_k if noise is not None else 0.0, noise_keys=["score_se"],
    )
    rule = TurningPointRule(config)
    for i in range(n):
        values = {"score": scores[i]}
        if noise is not None:
            values["score_se"] = math.nan if noise[i] is None else noise[i]
        if format_rates is not None:
            values["format_rate"] = math.nan if format_rates[i] is None else format_rates[i]
        rule.update(values, step=int(steps[i]))
    point = rule.turning_point
    return TurningPointResult(None if point is None else point["step"], None if point is None else point["index"],
                              explain(rule), rule.history)


_DERIVED = ("index", "score", "noise", "format_rate", "smoothed_values", "score_smoothed", "margin", "status")


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x.item() if isinstance(x, torch.Tensor) else x)
    return x if math.isfinite(x) else None
