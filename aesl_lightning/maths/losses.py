"""SFT objectives as pure maths: per-token weights over the statistics of the fused kernels.

Inputs are Hugging Face-style `logits [B, T, V]` (or hidden states and the LM head) and `labels [B, T]`
aligned with `input_ids` (-100 on prompt and padding); position t predicts `labels[t + 1]`. With m_t = 1 on
completion tokens, p_t = p_theta(y_t | x, y_<t), H_t the predictive entropy, p0 the frozen starting (base)
model and X_t = -sum_v r_v log p_theta(v) a soft cross-entropy against a detached distribution r, every loss
here has the form

    L = sum_t m_t [ a_t (-log p_t) + b_t X_t + c_t H_t ] / N

where the per-token coefficients a, b, c are computed from detached statistics by a *loss function* of the
registry (`LOSSES`, `register_loss`) and N is the number of completion tokens (of the optimiser step over all
ranks, when the caller passes it). A gated token lowers the signal instead of being renormalised back up.

`LossConfig` is in `aesl_lightning.maths.loss_config`; the built-in losses and `register_loss` in
`aesl_lightning.maths.loss_registry`; the anchor distributions in
`aesl_lightning.maths.anchors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from aesl_lightning.maths.anchors import BaseStates, loss_anchor
from aesl_lightning.maths.gates import LossTerms, TokenView, prefix_confidence, prefix_mean, smooth_gate
from aesl_lightning.maths.loss_config import LossConfig
from aesl_lightning.maths.loss_registry import LOSSES, LossSpec, register_loss
from aesl_lightning.ops.kernels import IGNORE_INDEX, TokenStats, linear_token_stats, masked_rows, row_chunk, token_entropy, token_stats

__all__ = [
    "IGNORE_INDEX", "LOSSES", "BaseStates", "LossConfig", "LossOutput", "LossSpec", "LossTerms", "TokenView",
    "aesl", "ce", "chunked_sft_loss", "dft", "learned_share", "masked_rows", "prefix_confidence", "prefix_mean", "register_loss", "resolve_quantiles", "row_chunk",
    "sft_loss", "smooth_gate", "token_entropy",
]


# ----------------------------------------------------------------------------------------------------------
# Assembly: kernel statistics -> coefficients -> scalar loss
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    """A loss value and the per-token quantities behind it, on the shifted grid [B, T-1] (detached, 0 off the mask).

    Attributes:
        loss: Scalar loss, differentiable.
        token_logprob: log p_t of the target token.
        mask: True on completion tokens.
        loss_weight: a_t, the weight of each token's -log p_t.
        gates: The loss's gates by name (token_gate, seq_gate, prefix_confidence, ...).
        entropy: Predictive entropy H_t (nats), when asked for or needed.
        token_correct: argmax of the logits equals the target, computed with the entropy.
        kl_to_base: KL(p0 || p_theta) at each position, for base-anchored losses.
        loss_sum: Detached sum_t m_t [a (-log p) + b X + c H] (the numerator of `loss`).
        view: The detached statistics the coefficients were computed from (for calibration and diagnostics).
    """

    loss: Tensor
    token_logprob: Tensor
    mask: Tensor
    loss_weight: Tensor
    gates: dict[str, Tensor] = field(default_factory=dict)
    entropy: Tensor | None = None
    token_correct: Tensor | None = None
    kl_to_base: Tensor | None = None
    loss_sum: Tensor | None = None
    view: TokenView | None = None

    @property
    def token_gate(self) -> Tensor | None:
        return self.gates.get("token_gate")

    @property
    def seq_gate(self) -> Tensor | None:
        return self.gates.get("seq_gate")

    @property
    def prefix_confidence(self) -> Tensor | None:
        return self.gates.get("prefix_confidence")

    def gate_stats(self) -> dict[str, Tensor]:
        """Means over completion tokens, detached 0-dim tensors under stable names for logging.

        `completion_tokens` (count), `token_prob_mean`, `loss_weight_mean` (share of the CE signal left),
        `learned_share` (share of tokens with weight > 0.5: the tokens being learned), `gated_off_fraction`
        (weight < 0.5), `<gate>_mean` for each gate, `anchor_kl` (mean KL(p0 || p_theta) in the loss) for base-anchored losses, `token_entropy` and
        `token_accuracy` when the entropy was computed. With no completion token every mean is 0.
        """
        mask = self.mask
        count = mask.sum()
        denom = count.clamp(min=1).to(self.token_logprob.dtype)

        def mean(values: Tensor) -> Tensor:
            return torch.where(mask, values.to(denom.dtype), 0).sum() / denom

        stats = {
            "completion_tokens": count,
            "token_prob_mean": mean(self.token_logprob.exp()),
            "loss_weight_mean": mean(self.loss_weight),
            "learned_share": mean((self.loss_weight > 0.5).to(denom.dtype)),
            "gated_off_fraction": mean((self.loss_weight < 0.5).to(denom.dtype)),
        }
        stats.update({f"{name}_mean": mean(values) for name, values in self.gates.items()})
        if self.kl_to_base is not None:
            stats["anchor_kl"] = mean(self.kl_to_base)  # not `kl_to_base`: validation logs that metric itself
        if self.entropy is not None:
            stats["token_entropy"] = mean(self.entropy)
        if self.token_correct is not None:
            stats["token_accuracy"] = mean(self.token_correct)
        return stats


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    config: LossConfig | None = None,
    *,
    return_entropy: bool = False,
    num_tokens: int | float | Tensor | None = None,
    base: BaseStates | None = None,
) -> LossOutput:
    """The SFT loss selected by `config.name` on `logits [B, T, V]` and `labels [B, T]` (module docstring).

    Args:
        logits: Causal-LM logits, any float dtype (softmax in float32, or float64 for float64).
        labels: Target ids aligned with `input_ids`, -100 on prompt and padding positions.
        config: Loss choice and knobs; `LossConfig()` when None.
        return_entropy: Also compute H_t and argmax accuracy in the same chunked pass.
        num_tokens: The normaliser N instead of the local count of completion tokens, e.g. the count over the
            optimiser step's micro-batches and all ranks. Values < 1 count as 1.
        base: The base model's states; required by losses with anchor="base".
    """
    config = config or LossConfig()
    _check_inputs(logits, labels, "logits")
    batch, length, vocab = logits.shape
    targets = _shift_labels(labels)
    anchor = loss_anchor(config, base, rows=None, grid=(batch, length), vocab=vocab)
    stats = token_stats(logits, targets, with_entropy=return_entropy or config.spec.needs_entropy, anchor=anchor)
    return _assemble(stats, None, labels, config, num_tokens, return_entropy)


def chunked_sft_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    config: LossConfig | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    num_tokens: int | float | Tensor | None = None,
    base: BaseStates | None = None,
) -> LossOutput:
    """`sft_loss(hidden @ lm_head_weight.T + lm_head_bias, labels, config)` without ever building the logits.

    Only completion tokens are projected, `chunk_size` rows at a time (default `config.chunk_size`, else a memory
    budget) in both passes; memory beyond the parameters and their gradients is O(chunk x V).
    """
    config = config or LossConfig()
    _check_inputs(hidden, labels, "hidden")
    batch, length, width = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != width:
        raise ValueError(f"chunked_sft_loss: lm_head_weight must be [V, {width}] to match hidden [B, T, {width}], found {list(lm_head_weight.shape)}")
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"chunked_sft_loss: lm_head_bias must be [{vocab}], found {list(lm_head_bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunked_sft_loss: chunk_size must be >= 1, found {chunk_size}")
    targets = _shift_labels(labels).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    anchor = loss_anchor(config, base, rows=rows, grid=(batch, length), vocab=vocab)
    stats = linear_token_stats(hidden.reshape(batch * length, width).index_select(0, rows), lm_head_weight, lm_head_bias,
                               targets.index_select(0, rows), with_entropy=return_entropy or config.spec.needs_entropy,
                               anchor=anchor, chunk_size=chunk_size or config.chunk_size)
    return _assemble(stats, rows, labels, config, num_tokens, return_entropy)


def ce(logits: Tensor, labels: Tensor, **kwargs) -> LossOutput:
    """Cross-entropy, L = sum_t m_t (-log p_t) / N. Keyword arguments as for `sft_loss`."""
    return sft_loss(logits, labels, LossConfig(name="ce"), **kwargs)


def dft(logits: Tensor, labels: Tensor, **kwargs) -> LossOutput:
    """Dynamic Fine-Tuning (Wu et al. 2025), L = sum_t m_t sg(p_t) (-log p_t) / N."""
    return sft_loss(logits, labels, LossConfig(name="dft"), **kwargs)


def aesl(logits: Tensor, labels: Tensor, config: LossConfig | None = None, **kwargs) -> LossOutput:
    """An AESL variant: `config` (default `LossConfig()`, the sound default) with any `LossConfig` field given as a
    keyword replaced (`aesl(logits, labels, tau_tok=0.8)`); other keywords go to `sft_loss`."""
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in LossConfig.__dataclass_fields__}
    config = replace(config or LossConfig(), **fields)
    if not config.name.startswith("aesl"):
        raise ValueError(f"aesl: config.name must be an AESL variant, found {config.name!r}")
    return sft_loss(logits, labels, config, **kwargs)


def resolve_quantiles(config: LossConfig, views: list[TokenView]) -> LossConfig:
    """`config` with tau_tok / tau_seq set from the quantiles it asks for, over the starting model's statistics.

    `views` hold the starting model's detached statistics on the training set (one per batch). tau_tok becomes the
    `tau_tok_quantile` quantile of p_t over completion tokens; tau_seq that of the
    subsequence confidence P^W_t over the tokens that have a prefix. The quantile fields are cleared in the result.
    """
    updates: dict = {"tau_tok_quantile": None, "tau_seq_quantile": None}
    window = 0 if config.name == "aesl_v1" else config.window
    if config.tau_tok_quantile is not None:
        source = [v.logprob[v.mask.bool()] for v in views]
        updates["tau_tok"] = float(torch.quantile(torch.cat(source).double().exp(), config.tau_tok_quantile))
    if config.tau_seq_quantile is not None:
        values = []
        for v in views:
            mean, count = prefix_mean(v.logprob, v.mask.bool(), window)
            values.append(mean.exp()[v.mask.bool() & (count > 0)])
        updates["tau_seq"] = float(torch.quantile(torch.cat(values).double(), config.tau_seq_quantile))
    for key in ("tau_tok", "tau_seq"):
        if key in updates:
            updates[key] = min(max(updates[key], 1e-6), 1.0)
    return replace(config, **updates)


def learned_share(config: LossConfig, views: list[TokenView]) -> tuple[float, int]:
    """(share of completion tokens whose weight a_t under `config` is > 0.5, number of completion tokens)."""
    learned = total = 0
    for view in views:
        weight = config.spec.fn(view, config).nll
        learned += int(((weight > 0.5) & view.mask.bool()).sum())
        total += int(view.mask.sum())
    return learned / max(total, 1), total


def _assemble(stats: TokenStats, rows: Tensor | None, labels: Tensor, config: LossConfig, num_tokens, return_entropy: bool) -> LossOutput:
    """Coefficients from the detached statistics, then the differentiable sum. `rows` maps compacted kernel rows
    to the flat [B * T] grid (None: the kernel ran on the whole grid)."""
    batch, length = labels.shape
    spec = config.spec
    mask = labels[:, 1:] != IGNORE_INDEX

    def grid(values: Tensor | None) -> Tensor | None:
        if values is None:
            return None
        values = values.detach()
        if rows is not None:
            values = values.new_zeros(batch * length).index_copy_(0, rows, values)
        return values.view(batch, length)[:, :-1]

    logprob = grid(stats.logprob)
    view = TokenView(logprob=logprob, mask=mask, entropy=grid(stats.entropy),
                     base_logprob=grid(stats.anchor_logprob) if spec.anchor == "base" else None,
                     base_entropy=grid(stats.anchor_entropy) if spec.anchor == "base" else None)
    terms = spec.fn(view, config)

    def per_row(coeff: Tensor) -> Tensor:
        padded = torch.cat([coeff.to(logprob.dtype) * mask, coeff.new_zeros(batch, 1, dtype=logprob.dtype)], dim=1).reshape(-1)
        return padded if rows is None else padded.index_select(0, rows)

    a = per_row(terms.nll)
    total = torch.where(a != 0, a * -stats.logprob.reshape(-1), 0.0).sum()
    if terms.soft_ce is not None:
        b = per_row(terms.soft_ce)
        # against the base, X_t - H(p0)_t = KL(p0 || p_theta)_t: same gradient, and the value the equation states
        soft = stats.soft_ce - stats.anchor_entropy if spec.anchor == "base" else stats.soft_ce
        total = total + torch.where(b != 0, b * soft.reshape(-1), 0.0).sum()
    if terms.entropy is not None:
        c = per_row(terms.entropy)
        total = total + torch.where(c != 0, c * stats.entropy.reshape(-1), 0.0).sum()
    count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)
    kl = None
    if spec.anchor == "base":
        kl = ((grid(stats.soft_ce) - view.base_entropy) * mask).clamp(min=0)
    return LossOutput(
        loss=total / count.to(total.dtype).clamp(min=1),
        token_logprob=logprob,
        mask=mask,
        loss_weight=terms.nll.to(logprob.dtype) * mask,
        gates={k: v * mask for k, v in terms.gates.items()},
        entropy=view.entropy if return_entropy or spec.needs_entropy else None,
        token_correct=grid(stats.correct) if return_entropy or spec.needs_entropy else None,
        kl_to_base=kl,
        loss_sum=total.detach(),
        view=view,
    )


def _shift_labels(labels: Tensor) -> Tensor:
    """[B, T] targets for logits position t: labels[t + 1], and -100 at the last position (keeps logits a view)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _check_inputs(values: Tensor, labels: Tensor, name: str) -> None:
    if values.dim() != 3:
        raise ValueError(f"losses: {name} must be [B, T, {'V' if name == 'logits' else 'H'}], found shape {list(values.shape)}")
    if labels.shape != values.shape[:2]:
        raise ValueError(f"losses: labels must be [B, T] = {list(values.shape[:2])} to match {name}, found {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"losses: labels must be integer token ids, found dtype {labels.dtype}")
    if not values.is_floating_point():
        raise ValueError(f"losses: {name} must be a floating-point tensor, found dtype {values.dtype}")
