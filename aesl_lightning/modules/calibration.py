"""Gate calibration: the starting model's statistics on the training set, and what each gate keeps at step 0.

    python -m aesl_lightning.modules.calibration --config experiments/quickstart.yaml [--batches 16] [--json out.json]

prints, for the config's loss and for every built-in loss at its defaults, the share of completion tokens that are
learned (weight > 0.5) at step 0. `SFTModule` runs the same measurement at the start of training: it resolves
quantile thresholds (`loss.tau_tok_quantile`, `loss.tau_seq_quantile`) and warns loudly when the gates keep under
5% of the completion tokens, which is almost always a mistake (nothing left to learn from).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from itertools import islice

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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m aesl_lightning.modules.calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="A fit config (YAML); may be repeated, as for fit.")
    parser.add_argument("--batches", type=int, default=16, help="Training batches to measure (default 16).")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args, overrides = parser.parse_known_args(argv)
    from aesl_lightning.cli import make_cli

    cli_args = [x for path in args.config for x in ("--config", path)] + overrides
    cli = make_cli(cli_args, run=False)
    module, data = cli.model, cli.datamodule
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    rows = report(module, islice(data.train_dataloader(), args.batches), module.loss_config)
    print(f"{'which':<20} {'loss':<20} {'tau_tok':>8} {'tau_seq':>8} {'window':>6} {'rho':>5} {'learned@0':>10} {'tokens':>7}")
    for row in rows:
        flag = "  <- under 5%: nothing left to learn" if row["learned_share"] < MIN_LEARNED_SHARE else ""
        print(f"{row['which']:<20} {row['loss']:<20} {row['tau_tok']:>8} {row['tau_seq']:>8} {row['window']:>6} {row['rho']:>5} "
              f"{row['learned_share']:>10.1%} {row['completion_tokens']:>7}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, "batches": args.batches, "loss": asdict(module.loss_config),
                       "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
