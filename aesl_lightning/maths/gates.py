"""AESL gates and the built-in SFT losses' per-token coefficients, as pure functions of detached statistics.

Each `*_terms(view, config) -> LossTerms` function gives the coefficients a_t, b_t, c_t of
L = sum_t m_t [a_t (-log p_t) + b_t X_t + c_t H_t] / N; `aesl_lightning.maths.loss_registry` registers them by name and
`aesl_lightning.maths.losses` computes the loss. Nothing here computes a softmax or knows about models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class LossKnobs(Protocol):
    """The knobs the loss functions read; `aesl_lightning.maths.loss_config.LossConfig` has them all (and their
    meaning). A protocol, so that the gates sit below the config, whose name check reads the registry of gates."""

    tau_tok: float
    tau_seq: float
    rho: float
    gate: str
    softness: float
    window: int
    protect_below: float
    anchor_weight: float
    entropy_margin: float
    drift_margin: float
    gem_beta: float


@dataclass
class TokenView:
    """What a loss function sees, on the shifted grid [B, T-1], detached, 0 off the mask."""

    logprob: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    base_logprob: Tensor | None = None  # log p0(y_t), for losses with anchor="base"
    base_entropy: Tensor | None = None

    @property
    def prob(self) -> Tensor:
        return self.logprob.exp() * self.mask


@dataclass
class LossTerms:
    """Per-token coefficients of L = sum_t m_t [a_t (-log p_t) + b_t X_t + c_t H_t] / N, and gates to log."""

    nll: Tensor
    soft_ce: Tensor | None = None
    entropy: Tensor | None = None
    gates: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Gate primitives
# ----------------------------------------------------------------------------------------------------------


def smooth_gate(value: Tensor, tau: float, config: LossKnobs) -> Tensor:
    """1 below the threshold, 0 at or above it: hard 1[value < tau] (off when tau >= 1), or soft sigmoid((tau - value) / s)."""
    if config.gate == "soft":
        return torch.sigmoid((tau - value) / config.softness)
    return (value < tau).to(value.dtype) if tau < 1 else torch.ones_like(value)


def prefix_mean(values: Tensor, mask: Tensor, window: int = 0) -> tuple[Tensor, Tensor]:
    """(mean, count) of `values` over the tokens s < t of t's completion span, the last `window` of them (0 = all).

    A completion span is a maximal run of mask = 1 in a row: a masked position (a prompt, or padding between two
    samples packed into one row) ends it, and the next completion starts with an empty prefix, so a sample never
    sees another sample's tokens as its prefix. The mean is 0 where that prefix is empty and off the mask.
    """
    mask = mask.bool()
    m = mask.to(values.dtype)
    values = values * m
    running = values.cumsum(-1)
    seen = m.cumsum(-1).long()  # completion tokens up to and including t; token t is the row's (seen - 1)-th
    # first_k[k] = sum of the row's first k completion values, so a run of them [lo, hi) sums to first_k[hi] - first_k[lo]
    first_k = values.new_zeros(values.shape[0], values.shape[1] + 1)
    first_k.scatter_(1, torch.where(mask, seen, 0), torch.where(mask, running, 0.0))
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    # completion tokens before the current span: fixed at each span's start, and larger at every later start
    before_span = torch.where(starts, seen - 1, 0).cummax(dim=-1).values
    hi = seen - mask.long()
    lo = torch.maximum(before_span, hi - window) if window > 0 else before_span
    lo = torch.minimum(lo, hi)
    total = first_k.gather(1, hi) - first_k.gather(1, lo)
    count = (hi - lo).to(values.dtype)
    mean = torch.where(count > 0, total / count.clamp(min=1), 0.0) * m
    return mean, count * m


def prefix_confidence(logprob: Tensor, mask: Tensor, window: int = 0) -> Tensor:
    """P_t = exp(mean of log p_s over the tokens s < t of t's completion span, the last `window` of them (0 = all)).

    0 where that prefix is empty (the first completion token is always learned) and off the mask.
    """
    mean, count = prefix_mean(logprob, mask, window)
    return torch.where(count > 0, mean.exp(), 0.0)


def _protected(weight: Tensor, view: TokenView, config: LossKnobs) -> Tensor:
    """Full weight for tokens the model has not learned: w_t = 1 where p_t < protect_below (>= 0.5, `LossConfig`)."""
    return torch.where(view.prob < config.protect_below, torch.ones_like(weight), weight) * view.mask


def _relax(gate: Tensor, config: LossKnobs) -> Tensor:
    """Gate in [0, 1] -> weight in [rho, 1]."""
    return config.rho + (1.0 - config.rho) * gate


# ----------------------------------------------------------------------------------------------------------
# Built-in losses
# ----------------------------------------------------------------------------------------------------------


def ce_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """Cross-entropy: a_t = 1."""
    return LossTerms(nll=view.mask.to(view.logprob.dtype))


def dft_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """Dynamic Fine-Tuning (Wu et al. 2025): a_t = sg(p_t)."""
    return LossTerms(nll=view.prob)


def gem_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """GEM (Li et al., ICLR 2025), linear h: per token -log p_y + sum_v q_v log p_v, q = sg(softmax(z / beta)),
    i.e. a_t = 1, b_t = -1 against r = q; its gradient with respect to the logits is q - onehot(y)."""
    m = view.mask.to(view.logprob.dtype)
    return LossTerms(nll=m, soft_ce=-m)


def aesl_v1_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """First reading of AESL: w_t = tokgate(p_t) * [1 if P_t < tau_seq else rho], P_t over the whole prefix.

    Kept to reproduce old runs only. It does NOT meet the protection rule (a token with p_t < 0.5 keeps at least
    half its CE gradient): with rho = 0 it silences every token after a confident prefix, learned or not (p = 0.002
    after six tokens at 0.99 gets weight 0).
    """
    prob, m = view.prob, view.mask.to(view.logprob.dtype)
    confidence = prefix_confidence(view.logprob, view.mask, 0)
    token_gate = smooth_gate(prob, config.tau_tok, config) * m
    seq_gate = _relax(smooth_gate(confidence, config.tau_seq, config), config) * m
    return LossTerms(nll=token_gate * seq_gate, gates={"token_gate": token_gate, "seq_gate": seq_gate, "prefix_confidence": confidence})


def _aesl_gates(view: TokenView, config: LossKnobs, token_prob: Tensor, relax_gate: Tensor, extra: dict) -> LossTerms:
    m = view.mask.to(view.logprob.dtype)
    token_gate = smooth_gate(token_prob, config.tau_tok, config) * m
    seq_gate = relax_gate * m
    weight = _protected(token_gate * seq_gate, view, config)
    return LossTerms(nll=weight, gates={"token_gate": token_gate, "seq_gate": seq_gate, **extra})


def aesl_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """AESL: w_t = max(tokgate(p_t) * seqgate(P^W_t), 1[p_t < protect_below]).

    tokgate(p) = 1[p < tau_tok]; seqgate = 1 if P^W_t < tau_seq else rho, with P^W_t the geometric-mean p of the
    `window` completion tokens before t. A confident token inside a confident span stops being learned; a token
    the model has not learned keeps its whole CE gradient, wherever it stands.
    """
    confidence = prefix_confidence(view.logprob, view.mask, config.window)
    seq_gate = _relax(smooth_gate(confidence, config.tau_seq, config), config)
    return _aesl_gates(view, config, view.prob, seq_gate, {"prefix_confidence": confidence})


def aesl_anchor_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """Gate-to-anchor: AESL's weights w_t, and the tokens it stops learning are pulled back to the base:
    L = sum_t m_t [w_t (-log p_t) + lambda (1 - w_t) KL(p0 || p_theta)_t] / N (b_t = lambda (1 - w_t))."""
    terms = aesl_terms(view, config)
    terms.soft_ce = config.anchor_weight * (1.0 - terms.nll) * view.mask
    return terms


def aesl_entropy_floor_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """Entropy floor: a position stops being learned (weight rho) once H_t < H0_t - delta; times AESL's token gate,
    with the protection."""
    floor = view.base_entropy - config.entropy_margin
    below = (view.entropy < floor).to(view.logprob.dtype)
    return _aesl_gates(view, config, view.prob, _relax(1.0 - below, config), {"entropy_gap": view.entropy - view.base_entropy})


def aesl_drift_terms(view: TokenView, config: LossKnobs) -> LossTerms:
    """Drift: relax a token (weight rho) once the preceding window's mean log p_theta - log p0 exceeds epsilon; times
    AESL's token gate, with the protection."""
    m = view.mask.to(view.logprob.dtype)
    mean_ratio, _ = prefix_mean(view.logprob - view.base_logprob, view.mask, config.window)
    drifted = (mean_ratio > config.drift_margin).to(m.dtype)
    return _aesl_gates(view, config, view.prob, _relax(1.0 - drifted, config), {"prefix_drift": mean_ratio})
