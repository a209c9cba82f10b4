"""The SFT loss registry: a loss name -> its coefficient function, its anchor distribution and whether it needs H_t.

Every loss has the form L = sum_t m_t [ a_t (-log p_t) + b_t X_t + c_t H_t ] / N (`aesl_lightning.maths.losses`); a loss
of the registry is the function that gives the coefficients a, b, c from detached statistics (`aesl_lightning.maths.gates`).
`LossConfig(name=...)` selects one. Built in (equations in each function's docstring and in the README):
- `ce`: a = 1.  `dft` (Wu et al. 2025): a = sg(p_t).
- `gem` (Li et al., ICLR 2025, GEM with linear h): a = 1, b = -1, r = softmax(z / beta): the gradient is
  softmax(z / beta) - onehot(y), which keeps mass off the target when the model is already sharp.
- `aesl`: the default Adaptive Early-Stop Loss: a token gate on p_t times a subsequence gate on the confidence
  of the preceding `window` completion tokens, and a token that is not learned (p_t < `protect_below`) always
  keeps its full CE weight.
- `aesl_v1`: the first reading (whole-prefix confidence, no protection), kept so old runs reproduce. It does NOT meet
  the protection rule (a token with p_t < 0.5 keeps at least half its CE gradient): after six tokens at 0.99 a token
  with p = 0.002 gets weight 0. Not for new runs.
- `protected=True` marks the losses that meet that rule through `protect_below` (aesl and the base-anchored
  variants): `LossConfig` refuses protect_below < 0.5 for them.
- base-anchored AESL (r = p0, so X_t - H(p0)_t = KL(p0 || p_theta) at t): `aesl_anchor` (gated tokens pulled to
  the base), `aesl_entropy_floor` (stop once H_t < H0_t - delta),
  `aesl_drift` (relax once the prefix drifted from p0 by more than epsilon).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aesl_lightning.maths.gates import (
    LossTerms, TokenView, aesl_anchor_terms, aesl_drift_terms, aesl_entropy_floor_terms, aesl_terms,
    LossKnobs, aesl_v1_terms, ce_terms, dft_terms, gem_terms,
)

__all__ = ["LOSSES", "LossSpec", "register_loss"]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its coefficient function, its anchor distribution, whether it needs H_t, and whether it
    keeps a token with p_t < `protect_below` at full CE weight (then protect_below < 0.5 is refused)."""

    fn: Callable[[TokenView, LossKnobs], LossTerms]
    anchor: Literal["base", "self"] | None = None
    needs_entropy: bool = False
    protected: bool = False


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, fn: Callable[[TokenView, LossKnobs], LossTerms], *, anchor: Literal["base", "self"] | None = None,
                  needs_entropy: bool = False, protected: bool = False) -> None:
    """Make `LossConfig(name=name)` train with `fn(view, config) -> LossTerms`.

    anchor="base" gives the view the base model's statistics and makes X_t the soft cross-entropy against p0;
    anchor="self" makes X_t the soft cross-entropy against softmax(logits / config.gem_beta). protected=True says
    `fn` keeps full CE weight where p_t < config.protect_below (`gates._protected`), and makes `LossConfig` refuse
    protect_below < 0.5, which would break the rule that an unlearned token keeps at least half its CE gradient.
    """
    LOSSES[name] = LossSpec(fn, anchor, needs_entropy, protected)


register_loss("ce", ce_terms)
register_loss("dft", dft_terms)
register_loss("gem", gem_terms, anchor="self")
register_loss("aesl", aesl_terms, protected=True)
register_loss("aesl_v1", aesl_v1_terms)  # the first reading: no protection (see the module docstring)
register_loss("aesl_anchor", aesl_anchor_terms, anchor="base", protected=True)
register_loss("aesl_entropy_floor", aesl_entropy_floor_terms, anchor="base", needs_entropy=True, protected=True)
register_loss("aesl_drift", aesl_drift_terms, anchor="base", protected=True)
