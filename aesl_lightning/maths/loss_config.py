"""`LossConfig`: which SFT loss to train with (a name in the loss registry) and its knobs.

Its own module, below the losses that read it: the registry (`aesl_lightning.maths.loss_registry`) checks the name,
`aesl_lightning.maths.losses` computes the loss. Checkpoints written before the sub-packages pickle it as
`aesl_lightning.losses.LossConfig`; `torch.load(weights_only=True)` allows it under both names
(`aesl_lightning.modules.checkpoint_load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aesl_lightning.maths.loss_registry import LOSSES, LossSpec


@dataclass
class LossConfig:
    """Which SFT loss to train with, and its knobs (each loss reads the ones it names).

    Args:
        name: Loss in the registry: ce, dft, gem, aesl (default AESL), aesl_anchor, aesl_entropy_floor, aesl_drift,
            aesl_v1 (first reading, reproduction only: does NOT meet the protection rule, an unlearned token after a
            confident prefix gets 0 gradient), or a name added with `register_loss`.
        tau_tok: AESL token gate: a token with p_t >= tau_tok stops being learned.
            With a hard gate, tau_tok >= 1 disables it.
        tau_seq: AESL subsequence gate: once the confidence of the preceding completion tokens (geometric mean
            of their p) reaches tau_seq, the token gets weight rho. With a hard gate, tau_seq >= 1 disables it.
        rho: Weight, in [0, 1], of a token whose subsequence is already learned (aesl_v1: of every later token).
        gate: Gate shape: "hard" (0/1 step at the threshold) or "soft" (sigmoid of width softness).
        softness: Width s of the soft gates, sigmoid((tau - x) / s).
        window: Completion tokens before t that the subsequence gate looks at (aesl and variants); 0 = the whole
            prefix.
        protect_below: A token with p_t below this keeps its full CE weight whatever the gates say, so what the
            model has not learned is always learned (aesl and its anchored variants, which refuse values < 0.5;
            aesl_v1 has no protection).
        anchor_weight: lambda of aesl_anchor: gated tokens are pulled to the base by lambda (1 - w_t) KL(p0 || p).
        entropy_margin: delta (nats) of aesl_entropy_floor: stop learning a position once H_t < H0_t - delta.
        drift_margin: epsilon of aesl_drift: relax a token once the mean log p - log p0 of the preceding window
            exceeds epsilon.
        gem_beta: beta of gem: the gradient's target distribution is softmax(logits / beta).
        tau_tok_quantile: Set tau_tok at the start of training to this quantile of the starting model's p_t on
            the training set (0.6 stops learning the 40% most confident tokens); None keeps tau_tok.
        tau_seq_quantile: Same for tau_seq, over the subsequence confidences; None keeps tau_seq.
        chunk_size: Tokens per chunk when the loss is computed from hidden states and the LM head, so the full
            [tokens x vocab] logits never exist. None computes the loss from the model's logits.
    """

    name: str = "aesl"
    tau_tok: float = 0.9
    tau_seq: float = 0.9
    rho: float = 0.0
    gate: Literal["hard", "soft"] = "hard"
    softness: float = 0.05
    window: int = 8
    protect_below: float = 0.5
    anchor_weight: float = 1.0
    entropy_margin: float = 0.5
    drift_margin: float = 0.5
    gem_beta: float = 0.7
    tau_tok_quantile: float | None = None
    tau_seq_quantile: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        where = "LossConfig"
        if self.name not in LOSSES:
            raise ValueError(f"{where}.name: expected one of {sorted(LOSSES)}, found {self.name!r}")
        if self.gate not in ("hard", "soft"):
            raise ValueError(f"{where}.gate: expected 'hard' or 'soft', found {self.gate!r}")
        for name in ("tau_tok", "tau_seq", "softness", "gem_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{where}.{name}: expected a value > 0, found {getattr(self, name)!r}")
        for name in ("rho", "protect_below"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{where}.{name}: expected a value in [0, 1], found {getattr(self, name)!r}")
        for name in ("tau_tok_quantile", "tau_seq_quantile"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{where}.{name}: expected None or a quantile in (0, 1), found {value!r}")
        if self.spec.protected and self.protect_below < 0.5:
            raise ValueError(f"{where}.protect_below: loss {self.name!r} must keep every token with p_t < 0.5 at full CE weight, so "
                             f"protect_below must be >= 0.5, found {self.protect_below!r} (the first reading without protection is "
                             "name: aesl_v1, for reproducing old runs only)")
        if self.window < 0 or self.anchor_weight < 0 or self.entropy_margin < 0:
            raise ValueError(f"{where}: window, anchor_weight and entropy_margin must be >= 0, found "
                             f"{self.window}, {self.anchor_weight}, {self.entropy_margin}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"{where}.chunk_size: expected None or an int >= 1, found {self.chunk_size!r}")

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.name]
