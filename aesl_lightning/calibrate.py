"""Gate calibration from the command line: what each loss's gates keep of a config's training set at step 0.

    python -m aesl_lightning.calibrate --config experiments/quickstart.yaml [--batches 16] [--json out.json]

prints, for the config's loss and for every built-in loss at its defaults, the share of completion tokens that are
learned (weight > 0.5) at step 0 (`aesl_lightning.modules.calibration.report`). The config is read as `fit` reads it
(`aesl_lightning.cli.make_cli`), so this command sits beside the CLI, above the modules it builds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from itertools import islice

from aesl_lightning.modules.calibration import MIN_LEARNED_SHARE, report


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m aesl_lightning.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="A fit config (YAML); may be repeated, as for fit.")
    parser.add_argument("--batches", type=int, default=16, help="Training batches to measure (default 16).")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args, overrides = parser.parse_known_args(argv)
    from aesl_lightning.cli import make_cli  # after parsing: --help needs no torch

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
