"""SFT losses for the cold-start stage: cross-entropy, DFT and the Adaptive Early-Stop Loss (AESL).

All losses take Hugging Face-style causal-LM inputs, `logits [B, T, V]` and `labels [B, T]` aligned with
`input_ids` (`-100` marks prompt and padding positions), and shift internally: position t predicts
`labels[t + 1]`. With m_t = 1[shifted label != -100] and p_t the probability of the target token,

    CE:    L = sum_t m_t * (-log p_t) / sum_t m_t
    DFT:   L = sum_t m_t * sg(p_t) * (-log p_t) / sum_t m_t                    (Wu et al. 2025)
    AESL:  L = sum_t m_t * w_tok_t * w_seq_t * (-log p_t) / sum_t m_t

where sg is stop-gradient and the AESL gates are computed from sg(p):

    token gate         hard: w_tok_t = 1[p_t < tau_tok]          soft: sigmoid((tau_tok - p_t) / s)
    prefix confidence  P_t = exp(mean_{s < t, m_s = 1} log p_s)  (completion prefix of the same sequence;
                       P_t = 0 when that prefix is empty, so the first completion token is always learned)
    subsequence gate   hard: w_seq_t = 1 if P_t < tau_seq else rho
                       soft: rho + (1 - rho) * sigmoid((tau_seq - P_t) / s)

The normaliser is the number of completion tokens, not the sum of weights, so gated tokens lower the
learning signal instead of being renormalised back up. A hard gate whose threshold is >= 1 is off
(weight 1 everywhere), so AESL with `gate="hard", tau_tok=tau_seq=1` equals CE bit for bit.

Memory: the [tokens x vocab] tensors dominate at 49k-152k vocabularies. `sft_loss` runs the softmax in
row chunks inside one autograd function that saves only the logits (which the caller holds anyway) and
writes the gradient straight into one [tokens x vocab] buffer, so it needs less memory than
`F.cross_entropy` (which also saves a full log-softmax). `chunked_sft_loss` goes further and never builds
the logits at all: it recomputes them chunk by chunk from the hidden states and the LM head in both the
forward and the backward pass (the idea behind Liger-Kernel's fused linear cross-entropy; this is an
independent implementation that returns per-token losses so that the AESL gates can see the whole
sequence before any gradient is formed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "IGNORE_INDEX",
    "LossConfig",
    "LossOutput",
    "aesl",
    "ce",
    "chunked_sft_loss",
    "dft",
    "sft_loss",
    "token_entropy",
]

IGNORE_INDEX = -100

# Elements per row chunk when the logits already exist: ~1 MiB of fp32 keeps the softmax temporaries
# in L2 cache, which is what makes the chunked pass as fast as one fused kernel over the full tensor.
_LOGITS_CHUNK_ELEMS = 1 << 18
# Elements per chunk of recomputed logits in `chunked_sft_loss` when no chunk size is given (~32 MiB fp32):
# large enough for an efficient matmul, small next to the [tokens x vocab] logits it replaces.
_LINEAR_CHUNK_ELEMS = 1 << 23


@dataclass
class LossConfig:
    """Which SFT loss to train with, and its knobs.

    The defaults are a starting point for AESL: a token the model already predicts with probability
    >= 0.9 stops being learned, and once the completion prefix is reproduced with geometric-mean
    probability >= 0.9 the rest of that sequence is not learned either (rho = 0). Raise both thresholds
    towards 1 to move towards CE; `gate="hard"` with `tau_tok = tau_seq = 1` is exactly CE.

    Args:
        name: Loss to use: "ce" (cross-entropy), "dft" (probability-weighted CE, Wu et al. 2025) or "aesl"
            (Adaptive Early-Stop Loss).
        tau_tok: AESL token gate threshold: a completion token with target probability p_t >= tau_tok is
            gated off (hard) or down-weighted (soft). With a hard gate, tau_tok >= 1 disables the gate.
        tau_seq: AESL subsequence gate threshold on the prefix confidence P_t (geometric mean of the target
            probabilities of the earlier completion tokens): once P_t >= tau_seq the remaining tokens get
            weight rho. With a hard gate, tau_seq >= 1 disables the gate.
        rho: AESL weight, in [0, 1], of tokens whose completion prefix is already confident (0 stops
            learning the rest of the sequence, 1 disables the subsequence gate).
        gate: AESL gate shape: "hard" (0/1 step at the threshold) or "soft" (sigmoid of width softness).
        softness: Width s of the soft gates, sigmoid((tau - p) / s); smaller is closer to the hard step.
            0.05 turns a gate from ~0.88 to ~0.12 as the probability crosses tau -/+ 0.1.
        chunk_size: Tokens per chunk when the loss is computed from hidden states and the LM head
            (`chunked_sft_loss`), so the full [tokens x vocab] logits never exist. None computes the loss
            from the model's logits.
    """

    name: Literal["ce", "dft", "aesl"] = "aesl"
    tau_tok: float = 0.9
    tau_seq: float = 0.9
    rho: float = 0.0
    gate: Literal["hard", "soft"] = "hard"
    softness: float = 0.05
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        where = "LossConfig"
        if self.name not in ("ce", "dft", "aesl"):
            raise ValueError(f"{where}.name: expected 'ce', 'dft' or 'aesl', found {self.name!r}")
        if self.gate not in ("hard", "soft"):
            raise ValueError(f"{where}.gate: expected 'hard' or 'soft', found {self.gate!r}")
        for field in ("tau_tok", "tau_seq"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{where}.{field}: expected a threshold > 0, found {getattr(self, field)!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"{where}.rho: expected a weight in [0, 1], found {self.rho!r}")
        if not self.softness > 0:
            raise ValueError(f"{where}.softness: expected a width > 0, found {self.softness!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"{where}.chunk_size: expected None or an int >= 1, found {self.chunk_size!r}")


@dataclass
class LossOutput:
    """A loss value and the per-token quantities behind it, on the shifted grid [B, T-1].

    Position t of every [B, T-1] tensor is the prediction of `labels[:, t + 1]` from `logits[:, t]`.
    Everything except `loss` is detached and is 0 (False) where `mask` is False.

    Attributes:
        loss: Scalar loss, differentiable (float32, or float64 for float64 inputs).
        token_logprob: log p_t of the target token.
        mask: True on completion tokens (shifted label != -100).
        loss_weight: Weight of each token's -log p_t in the loss: 1 (CE), p_t (DFT), w_tok * w_seq (AESL).
        token_gate: AESL token gate w_tok, else None.
        seq_gate: AESL subsequence gate w_seq, else None.
        prefix_confidence: AESL prefix confidence P_t, else None.
        entropy: Entropy (nats) of the predictive distribution when asked for with `return_entropy`, else None.
        token_correct: argmax of the logits equals the target, computed together with `entropy`, else None.
    """

    loss: Tensor
    token_logprob: Tensor
    mask: Tensor
    loss_weight: Tensor
    token_gate: Tensor | None = None
    seq_gate: Tensor | None = None
    prefix_confidence: Tensor | None = None
    entropy: Tensor | None = None
    token_correct: Tensor | None = None

    def gate_stats(self) -> dict[str, Tensor]:
        """Means over completion tokens, as detached 0-dim tensors under stable names for logging.

        Always present: `completion_tokens` (count), `token_prob_mean` (mean p_t), `loss_weight_mean` (mean
        weight: the share of the CE learning signal that is left), `gated_off_fraction` (share of tokens with
        weight < 0.5, i.e. receiving less than half of their CE signal; for hard gates with rho < 0.5 these are
        exactly the tokens with weight 0). AESL adds `token_gate_mean`, `seq_gate_mean` and
        `prefix_confidence_mean`; `return_entropy=True` adds `token_entropy` (nats) and `token_accuracy`.
        With no completion token every mean is 0.
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
            "gated_off_fraction": mean((self.loss_weight < 0.5).to(denom.dtype)),
        }
        if self.token_gate is not None:
            stats["token_gate_mean"] = mean(self.token_gate)
        if self.seq_gate is not None:
            stats["seq_gate_mean"] = mean(self.seq_gate)
        if self.prefix_confidence is not None:
            stats["prefix_confidence_mean"] = mean(self.prefix_confidence)
        if self.entropy is not None:
            stats["token_entropy"] = mean(self.entropy)
        if self.token_correct is not None:
            stats["token_accuracy"] = mean(self.token_correct)
        return stats


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    config: LossConfig | None = None,
    *,
    return_entropy: bool = False,
    num_tokens: int | Tensor | None = None,
) -> LossOutput:
    """The SFT loss selected by `config.name` ("ce", "dft" or "aesl"; see the module docstring).

    Args:
        logits: [B, T, V] causal-LM logits (any float dtype; softmax runs in float32, or float64 for float64).
        labels: [B, T] target ids aligned with `input_ids`, -100 on prompt and padding positions.
        config: Loss choice and knobs; `LossConfig()` (AESL with its defaults) when None.
        return_entropy: Also compute the per-token entropy and argmax accuracy (`LossOutput.entropy`,
            `LossOutput.token_correct`), in the same chunked pass, without extra [tokens x vocab] copies.
        num_tokens: Normaliser to use instead of the local count of completion tokens, e.g. the count over
            all micro-batches of a gradient-accumulation step or all ranks. Values < 1 count as 1.

    Returns:
        LossOutput on the shifted grid [B, T-1]. With no completion token the loss is 0 (no NaN) and still
        connected to `logits`, whose gradient is then 0.
    """
    config = config or LossConfig()
    _check_inputs(logits, labels, "logits", logits.shape[:2] if logits.dim() == 3 else None)
    batch, length, vocab = logits.shape
    targets = _shift_labels(labels)
    _check_targets(targets, vocab)
    rows_per_chunk = max(1, _LOGITS_CHUNK_ELEMS // vocab)
    nll, entropy, correct = _TokenNLL.apply(logits.reshape(batch * length, vocab), targets.reshape(-1), rows_per_chunk, return_entropy)
    return _assemble(
        nll.view(batch, length)[:, :-1],
        labels[:, 1:] != IGNORE_INDEX,
        config,
        entropy.view(batch, length)[:, :-1] if return_entropy else None,
        correct.view(batch, length)[:, :-1] if return_entropy else None,
        num_tokens,
    )


def ce(logits: Tensor, labels: Tensor, **kwargs) -> LossOutput:
    """Cross-entropy, L = sum_t m_t * (-log p_t) / sum_t m_t. Keyword arguments as for `sft_loss`."""
    return sft_loss(logits, labels, LossConfig(name="ce"), **kwargs)


def dft(logits: Tensor, labels: Tensor, **kwargs) -> LossOutput:
    """Dynamic Fine-Tuning (Wu et al. 2025), L = sum_t m_t * sg(p_t) * (-log p_t) / sum_t m_t."""
    return sft_loss(logits, labels, LossConfig(name="dft"), **kwargs)


def aesl(
    logits: Tensor,
    labels: Tensor,
    *,
    tau_tok: float = 0.9,
    tau_seq: float = 0.9,
    rho: float = 0.0,
    gate: Literal["hard", "soft"] = "hard",
    softness: float = 0.05,
    **kwargs,
) -> LossOutput:
    """Adaptive Early-Stop Loss, L = sum_t m_t * w_tok_t * w_seq_t * (-log p_t) / sum_t m_t.

    The gates (module docstring, `LossConfig` for the knobs) use sg(p_t), so the gradient of a token is
    w_tok_t * w_seq_t times its CE gradient, and exactly 0 for a gated-off token. Other keyword arguments as
    for `sft_loss`.
    """
    config = LossConfig(name="aesl", tau_tok=tau_tok, tau_seq=tau_seq, rho=rho, gate=gate, softness=softness)
    return sft_loss(logits, labels, config, **kwargs)


def chunked_sft_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    config: LossConfig | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    num_tokens: int | Tensor | None = None,
) -> LossOutput:
    """`sft_loss(hidden @ lm_head_weight.T + lm_head_bias, labels, config)` without ever building the logits.

    Only completion tokens are projected. A first pass computes log p_t (and entropy, argmax) chunk by
    chunk without keeping the logits; the gates then see whole sequences; the backward pass recomputes
    each chunk's logits and accumulates the gradients of `hidden`, `lm_head_weight` and `lm_head_bias`.
    Memory beyond the parameters and their gradients is O(chunk_size x V) instead of O(B x T x V);
    the price is one extra [chunk x H] @ [H x V] matmul per chunk.

    Args:
        hidden: [B, T, H] final hidden states (after the last norm), the LM head's input.
        lm_head_weight: [V, H] LM head weight (tied embeddings work: pass the embedding weight).
        labels: [B, T] target ids aligned with `input_ids`, -100 on prompt and padding positions.
        config: Loss choice and knobs; `LossConfig()` when None.
        lm_head_bias: Optional [V] LM head bias.
        chunk_size: Tokens per chunk; defaults to `config.chunk_size`, else about 8M logits per chunk.
        return_entropy: Also compute per-token entropy and argmax accuracy.
        num_tokens: Normaliser instead of the local count of completion tokens (see `sft_loss`).
    """
    config = config or LossConfig()
    _check_inputs(hidden, labels, "hidden", hidden.shape[:2] if hidden.dim() == 3 else None)
    batch, length, width = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != width:
        raise ValueError(f"chunked_sft_loss: lm_head_weight must be [V, {width}] to match hidden [B, T, {width}], found {list(lm_head_weight.shape)}")
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"chunked_sft_loss: lm_head_bias must be [{vocab}], found {list(lm_head_bias.shape)}")
    chunk = chunk_size or config.chunk_size or max(1, _LINEAR_CHUNK_ELEMS // vocab)
    if chunk < 1:
        raise ValueError(f"chunked_sft_loss: chunk_size must be >= 1, found {chunk}")

    targets = _shift_labels(labels).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    row_targets = targets.index_select(0, rows)
    _check_targets(row_targets, vocab)
    row_hidden = hidden.reshape(batch * length, width).index_select(0, rows)
    nll_rows, entropy_rows, correct_rows = _LinearTokenNLL.apply(row_hidden, lm_head_weight, lm_head_bias, row_targets, chunk, return_entropy)

    acc = nll_rows.dtype
    mask = labels[:, 1:] != IGNORE_INDEX

    def to_grid(values: Tensor) -> Tensor:
        grid = values.new_zeros(batch * length)
        grid.index_copy_(0, rows, values)
        return grid.view(batch, length)[:, :-1]

    nll_grid = to_grid(nll_rows.detach())
    weight, token_gate, seq_gate, prefix_confidence = _loss_weights(nll_grid.neg(), mask, config)
    weight_rows = weight.new_zeros(batch, length)
    weight_rows[:, :-1] = weight
    loss = (nll_rows * weight_rows.reshape(-1).index_select(0, rows)).sum() / _normaliser(mask, num_tokens, acc)
    return LossOutput(
        loss=loss,
        token_logprob=nll_grid.neg().masked_fill_(~mask, 0),
        mask=mask,
        loss_weight=weight,
        token_gate=token_gate,
        seq_gate=seq_gate,
        prefix_confidence=prefix_confidence,
        entropy=to_grid(entropy_rows) if return_entropy else None,
        token_correct=to_grid(correct_rows) if return_entropy else None,
    )


@torch.no_grad()
def masked_rows(logits: torch.Tensor, mask: torch.Tensor | None, caller: str) -> torch.Tensor:
    """Indices of the rows of `logits.reshape(-1, V)` that `mask` (shape `logits.shape[:-1]`) selects; all
    rows when `mask` is None. The error names `caller`."""
    if mask is None:
        return torch.arange(logits.shape[:-1].numel(), device=logits.device)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"{caller}: mask must have shape {list(logits.shape[:-1])} (logits without the vocab axis), found {list(mask.shape)}")
    return mask.reshape(-1).nonzero().squeeze(1)


def row_chunk(vocab: int) -> int:
    """Default rows per chunk of a [rows x vocab] computation: about 1 MiB of float32 per operand."""
    return max(1, _LOGITS_CHUNK_ELEMS // vocab)


def token_entropy(
    logits: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Entropy H = -sum_v p(v) log p(v), in nats, of the distributions in `logits [..., V]`; no gradient.

    No shifting: `mask [...]` (same leading shape as `logits`) selects the rows that count; None counts all.
    Rows are processed `chunk_size` at a time (default: ~1 MiB of float32 per chunk), so no full-size copy
    of the logits is made. reduction "mean" averages over the selected rows (0 when none), "sum" adds them
    up (pair it with `mask.sum()` for distributed averaging), "none" returns [...] with 0 on unselected rows.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = masked_rows(logits, mask, "token_entropy")
    acc = _acc_dtype(logits.dtype)
    entropy = torch.zeros(flat.shape[0], dtype=acc, device=logits.device)
    for chunk_rows in rows.split(chunk_size or row_chunk(logits.shape[-1])):
        entropy.index_copy_(0, chunk_rows, _entropy(torch.log_softmax(flat.index_select(0, chunk_rows).to(acc), dim=-1)))
    if reduction == "none":
        return entropy.view(logits.shape[:-1])
    if reduction == "sum":
        return entropy.sum()
    if reduction == "mean":
        return entropy.sum() / max(rows.numel(), 1)
    raise ValueError(f"token_entropy: reduction must be 'mean', 'sum' or 'none', found {reduction!r}")


# ----------------------------------------------------------------------------------------------------------
# Gates and assembly
# ----------------------------------------------------------------------------------------------------------


def _loss_weights(logprob: Tensor, mask: Tensor, config: LossConfig) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Detached per-token weights (0 off the mask) and, for AESL, (token_gate, seq_gate, prefix_confidence)."""
    m = mask.to(logprob.dtype)
    if config.name == "ce":
        return m, None, None, None
    prob = logprob.exp()
    if config.name == "dft":
        return m * prob, None, None, None

    logprob = logprob * m
    prefix_sum = logprob.cumsum(dim=-1) - logprob  # sum of log p_s over s < t on the mask
    prefix_count = m.cumsum(dim=-1) - m
    prefix_confidence = torch.where(prefix_count > 0, (prefix_sum / prefix_count.clamp(min=1)).exp(), 0.0) * m

    if config.gate == "hard":
        # A threshold >= 1 switches the gate off: p_t can round to exactly 1.0, and AESL must then be CE.
        token_gate = (prob < config.tau_tok).to(m.dtype) if config.tau_tok < 1 else torch.ones_like(m)
        if config.tau_seq < 1:
            seq_gate = torch.where(prefix_confidence < config.tau_seq, 1.0, config.rho).to(m.dtype)
        else:
            seq_gate = torch.ones_like(m)
    else:
        s = config.softness
        token_gate = torch.sigmoid((config.tau_tok - prob) / s)
        seq_gate = config.rho + (1.0 - config.rho) * torch.sigmoid((config.tau_seq - prefix_confidence) / s)
    token_gate, seq_gate = token_gate * m, seq_gate * m
    return m * token_gate * seq_gate, token_gate, seq_gate, prefix_confidence


def _assemble(
    nll: Tensor,
    mask: Tensor,
    config: LossConfig,
    entropy: Tensor | None,
    correct: Tensor | None,
    num_tokens: int | Tensor | None,
) -> LossOutput:
    logprob = nll.detach().neg().masked_fill_(~mask, 0)
    weight, token_gate, seq_gate, prefix_confidence = _loss_weights(logprob, mask, config)
    loss = (nll * weight).sum() / _normaliser(mask, num_tokens, nll.dtype)
    return LossOutput(
        loss=loss,
        token_logprob=logprob,
        mask=mask,
        loss_weight=weight,
        token_gate=token_gate,
        seq_gate=seq_gate,
        prefix_confidence=prefix_confidence,
        entropy=entropy,
        token_correct=correct,
    )


def _normaliser(mask: Tensor, num_tokens: int | Tensor | None, dtype: torch.dtype) -> Tensor:
    count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)
    return count.to(dtype).clamp(min=1)


def _shift_labels(labels: Tensor) -> Tensor:
    """[B, T] targets for logits position t: labels[t + 1], and -100 at the last position.

    Shifting the labels instead of slicing the logits keeps the logits a view (no [B x T x V] copy).
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _check_inputs(values: Tensor, labels: Tensor, name: str, leading: torch.Size | None) -> None:
    if values.dim() != 3 or leading is None:
        raise ValueError(f"losses: {name} must be [B, T, {'V' if name == 'logits' else 'H'}], found shape {list(values.shape)}")
    if labels.shape != leading:
        raise ValueError(f"losses: labels must be [B, T] = {list(leading)} to match {name}, found {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"losses: labels must be integer token ids, found dtype {labels.dtype}")
    if not values.is_floating_point():
        raise ValueError(f"losses: {name} must be a floating-point tensor, found dtype {values.dtype}")


def _check_targets(targets: Tensor, vocab: int) -> None:
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(f"losses: labels must be -100 or token ids in [0, {vocab}), found values in [{int(valid.min())}, {int(valid.max())}]")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _entropy(logprob: Tensor) -> Tensor:
    """Row entropies of a [rows, V] log-probability chunk; 0 * log 0 counts as 0 (for -inf logits)."""
    return logprob.exp().mul_(logprob).nan_to_num_(0.0).sum(dim=-1).neg_()


def _softmax_minus_onehot(logits: Tensor, targets: Tensor, grad: Tensor) -> Tensor:
    """grad_t * (softmax(z_t) - onehot(y_t)) for a [rows, V] chunk: d(grad . nll) / d logits."""
    probs = torch.softmax(logits, dim=-1).mul_(grad[:, None])
    return probs.scatter_add_(1, targets[:, None], -grad[:, None])


# ----------------------------------------------------------------------------------------------------------
# Autograd functions: per-token -log p_t with chunked softmax
# ----------------------------------------------------------------------------------------------------------


class _TokenNLL(torch.autograd.Function):
    """Per-row -log softmax(logits)[target] for [N, V] logits (0 on rows whose target is -100).

    Forward keeps no [N x V] tensor (the log-softmax is formed a few rows at a time); backward recomputes the
    softmax chunk by chunk and writes into a single [N x V] gradient buffer. Rows whose incoming gradient is
    0 (ignored or gated-off tokens) are skipped and get an exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, rows_per_chunk: int, with_stats: bool):
        acc = _acc_dtype(logits.dtype)
        rows = logits.shape[0]
        nll = torch.zeros(rows, dtype=acc, device=logits.device)
        entropy = torch.zeros(rows if with_stats else 0, dtype=acc, device=logits.device)
        correct = torch.zeros(rows if with_stats else 0, dtype=torch.bool, device=logits.device)
        for chunk_rows in (targets != IGNORE_INDEX).nonzero().squeeze(1).split(rows_per_chunk):
            chunk_targets = targets.index_select(0, chunk_rows)
            logprob = torch.log_softmax(logits.index_select(0, chunk_rows).to(acc), dim=-1)
            nll.index_copy_(0, chunk_rows, logprob.gather(1, chunk_targets[:, None]).squeeze(1).neg_())
            if with_stats:
                correct.index_copy_(0, chunk_rows, logprob.argmax(dim=-1) == chunk_targets)
                entropy.index_copy_(0, chunk_rows, _entropy(logprob))
        ctx.save_for_backward(logits, targets)
        ctx.rows_per_chunk = rows_per_chunk
        ctx.mark_non_differentiable(entropy, correct)
        return nll, entropy, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, _grad_entropy: Tensor, _grad_correct: Tensor):
        logits, targets = ctx.saved_tensors
        active = (grad_nll != 0) & (targets != IGNORE_INDEX)
        active_rows = active.nonzero().squeeze(1)
        if active_rows.numel() == 0:
            return torch.zeros_like(logits), None, None, None
        grad_logits = torch.empty_like(logits)
        grad_logits.index_fill_(0, (~active).nonzero().squeeze(1), 0)
        acc = _acc_dtype(logits.dtype)
        for chunk_rows in active_rows.split(ctx.rows_per_chunk):
            chunk_grad = _softmax_minus_onehot(
                logits.index_select(0, chunk_rows).to(acc), targets.index_select(0, chunk_rows), grad_nll.index_select(0, chunk_rows).to(acc)
            )
            grad_logits.index_copy_(0, chunk_rows, chunk_grad.to(logits.dtype))
        return grad_logits, None, None, None


class _LinearTokenNLL(torch.autograd.Function):
    """Per-row -log softmax(hidden @ weight.T + bias)[target] for [M, H] hidden rows, all targets valid.

    The [M x V] logits are never held: forward and backward each recompute them `rows_per_chunk` rows at a
    time. Backward accumulates d hidden, d weight and d bias from every chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, rows_per_chunk: int, with_stats: bool):
        acc = _acc_dtype(hidden.dtype)
        rows = hidden.shape[0]
        nll = torch.zeros(rows, dtype=acc, device=hidden.device)
        entropy = torch.zeros(rows if with_stats else 0, dtype=acc, device=hidden.device)
        correct = torch.zeros(rows if with_stats else 0, dtype=torch.bool, device=hidden.device)
        for start in range(0, rows, rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            logprob = torch.log_softmax(_project(hidden[chunk], weight, bias).to(acc), dim=-1)
            nll[chunk] = logprob.gather(1, targets[chunk, None]).squeeze(1).neg_()
            if with_stats:
                correct[chunk] = logprob.argmax(dim=-1) == targets[chunk]
                entropy[chunk] = _entropy(logprob)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.rows_per_chunk = rows_per_chunk
        ctx.mark_non_differentiable(entropy, correct)
        return nll, entropy, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, _grad_entropy: Tensor, _grad_correct: Tensor):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = _acc_dtype(hidden.dtype)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        for chunk_rows in (grad_nll != 0).nonzero().squeeze(1).split(ctx.rows_per_chunk):
            chunk_hidden = hidden.index_select(0, chunk_rows)
            grad_logits = _softmax_minus_onehot(
                _project(chunk_hidden, weight, bias).to(acc), targets.index_select(0, chunk_rows), grad_nll.index_select(0, chunk_rows).to(acc)
            )
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden.index_copy_(0, chunk_rows, grad_logits @ weight)
            if need_weight:
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad_logits.t(), chunk_hidden)
                else:
                    grad_weight += grad_logits.t() @ chunk_hidden
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
            None,
        )


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
