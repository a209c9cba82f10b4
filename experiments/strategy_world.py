"""The strategy world study (issue 21): a controlled test of the paper's mechanism on a from-scratch base model.

    python experiments/strategy_world.py --preflight            # base model, checks M1-M4 (preflight.md)
    python experiments/strategy_world.py --run [--until 18:00]  # the study's units, resumable, deadline-aware
    python experiments/strategy_world.py --report               # results.md / results.json from the unit files alone
    python experiments/strategy_world.py --smoke --preflight    # every stage at toy sizes (minutes), for a check

The world, the arms and the rules are in experiments/results/strategy-world/plan.md; the numbers in
experiments/strategy_world.yaml. Each unit leaves `<out>/units/<id>.json`; weights live under `--work`
(git-ignored). Every unit records the commit and the machine's load at its start and end.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from aesl_lightning.study.schedule import parse_until  # noqa: E402  (HH:MM UTC or ISO -> seconds since the epoch)

SMOKE = {"world": {"pretrain_size": 256, "val_size": 8, "rl_size": 32, "test_size": 8, "coldstart_size": 8},
         "base": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64, "steps": 4, "batch_size": 8, "snapshot_every": 2,
                  "snapshot_from": 2},
         "eval": {"samples": 2, "test_samples": 2, "max_new_tokens": 24},
         "sft": {"grid": [0, 1, 2, 4], "batch_size": 4}, "rl": {"pool_size": 8, "prompts_per_step": 4, "num_generations": 2},
         "main": {"seeds": [0, 1]}}


def load_config(path: Path, smoke: bool = False) -> dict:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    if smoke:
        cfg = copy.deepcopy(cfg)
        for section, values in SMOKE.items():
            cfg[section].update(values)
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "strategy_world.yaml")
    parser.add_argument("--work", type=Path, default=None, help="weights and logs (default lightning_logs/strategy_world[-smoke])")
    parser.add_argument("--out", type=Path, default=None, help="unit records and reports (default experiments/results/strategy-world; <work>/results with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks that every stage runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preflight", action="store_true")
    what.add_argument("--run", action="store_true")
    what.add_argument("--report", action="store_true")
    parser.add_argument("--only", default=None, help="run only units whose id starts with this")
    parser.add_argument("--until", default=None, help="start no unit that would end after this time (HH:MM UTC or ISO)")
    args = parser.parse_args(argv)
    suffix = "-smoke" if args.smoke else ""
    work = args.work or HERE.parent / "lightning_logs" / f"strategy_world{suffix}"
    out = args.out or (work / "results" if args.smoke else HERE / "results" / "strategy-world")
    cfg = load_config(args.config, args.smoke)

    import torch

    torch.set_num_threads(args.threads)
    from world import study

    if args.report:
        path = study.report(cfg, out)
        print(f"report: {path}")
        return
    units = study.preflight_units(cfg) if args.preflight else study.main_units(cfg)
    if args.only:
        units = [u for u in units if u.id.startswith(args.only)]
    began = time.time()
    study.run(cfg, work, out, units, parse_until(args.until), check_cap=not args.smoke)  # the smoke sizes' cap is a toy
    print(json.dumps({"wall_minutes": (time.time() - began) / 60}))


if __name__ == "__main__":
    main()
