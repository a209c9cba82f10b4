"""Gate calibration: the starting model's statistics on the training set, and what each gate keeps at step 0.

`report` gives, for a config's loss and for every built-in loss at its defaults, the share of completion tokens
that are learned (weight > 0.5) at step 0 (the command: `python -m aesl_lightning.calibrate --config <fit.yaml>`).
`SFTModule` runs the same measurement at the start of training: it resolves quantile thresholds
(`loss.tau_tok_quantile`, `loss.tau_seq_quantile`) and warns loudly when the gates keep under 5% of the completion
tokens, which is almost always a mistake (nothing left to learn from).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.distributed as dist

from aesl_lightning.maths.losses import LOSSES, LossConfig, TokenView, learned_share, resolve_quantiles

log = logging.getLogger("aesl_lightning")

MIN_LEARNED_SHARE = 0.05
"""Below this share of completion tokens learned at step 0 a run is flagged: its gates leave almost no signal."""


@torch.no_grad()
def measure(module, batches, with_base: bool) -> list[TokenView]:
    """The starting model's detached statistics (log p_t, H_t and, `with_base`, log p0 and H0) on `batches`, on CPU."""
    probe = LossConfig(name="aesl_entropy_floor" if with_base else "ce")
    views = []
    was_training = module.model.training
    module.model.eval()  # the statistics of the model itself, without dropout
    try:
        for batch in batches:
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = module.compute_loss(batch, config=probe)
            v = out.view
            views.append(TokenView(*(t.cpu() if t is not None else None
                                     for t in (v.logprob, v.mask, v.entropy, v.base_logprob, v.base_entropy))))
    finally:
        module.model.train(was_training)
    return views


def gather_views(views: list[TokenView]) -> list[TokenView]:
    """Every rank's views on every rank (the thresholds must not differ between ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return views
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, views)
    return [v for part in gathered for v in part]


def calibrate(module, batches, config: LossConfig) -> tuple[LossConfig, float, int]:
    """(config with quantile thresholds resolved, share of completion tokens learned at step 0, token count)."""
    views = gather_views(measure(module, batches, with_base=config.spec.anchor == "base"))
    resolved = resolve_quantiles(config, views)
    share, total = learned_share(resolved, views)
    return resolved, share, total


def report(module, batches, config: LossConfig) -> list[dict]:
    """Rows (loss, thresholds, share learned at step 0) for `config` and every built-in loss at its defaults."""
    needs_base = any(spec.anchor == "base" for spec in LOSSES.values())
    views = measure(module, batches, with_base=needs_base)
    candidates = [("config", config)] + [(name, replace(LossConfig(name=name), chunk_size=None)) for name in LOSSES]
    rows = []
    for label, candidate in candidates:
        resolved = resolve_quantiles(candidate, views)
        share, total = learned_share(resolved, views)
        rows.append({"which": label, "loss": resolved.name, "tau_tok": round(resolved.tau_tok, 4), "tau_seq": round(resolved.tau_seq, 4),
                     "window": resolved.window, "rho": resolved.rho, "learned_share": round(share, 4), "completion_tokens": total})
    return rows
