"""The real-model study (plan amendment 1, issue 22): does a diversity-aware cold start make SmolLM2-135M-Instruct a
better RL starting point? As units of <= ~2 h on aesl_lightning.study.

    python experiments/real_study.py --run [--until 18:00]   # the units the records call for, resumable, deadline-aware
    python experiments/real_study.py --preflight             # only the units that decide the scope (CE seed 0, screen, pilot)
    python experiments/real_study.py --report                # results.md / results.json / figures from the unit files alone
    python experiments/real_study.py --smoke --run           # every stage with a tiny model at toy sizes (about a minute)
    python experiments/real_study.py --config experiments/real_study_gpu.yaml --run   # the same study at GPU size

The design, claims and verdict rules are in experiments/results/real/plan.md ("Amendment 1"); the numbers in
experiments/real_study.yaml. Each unit leaves `<out>/units/<id>.json`; weights live under the work folder
(git-ignored), where a CE unit keeps only the snapshots the rules can pick. Units that depend on the RL pilot's
outcome are listed only once the pilot's records decide it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from aesl_lightning.study.schedule import parse_until  # noqa: E402  (HH:MM UTC or ISO -> seconds since the epoch)

SECTIONS = ("model", "paths", "machine", "data", "sft", "eval", "c1", "screen", "rl", "pilot", "arms", "verdicts", "estimates")
# Toy sizes for a check that every stage runs (a tiny random model: it solves nothing, so the screen takes every prompt
# and the pilot's pass rule is relaxed so that the arms run too).
SMOKE = {"model": "tiny",
         "data": {"coldstart": 8, "val": 4, "rl": 12, "test": 4},
         "sft": {"max_steps": 4, "batch_size": 4, "grid": [0, 1, 2, 4]},
         "eval": {"samples": 2, "max_new_tokens": 8, "batch_size": 8, "val_problems": 4, "test_problems": 4},
         "c1": {"seeds": [0, 1], "extra_seeds": [2], "se_replicates": 50},
         "screen": {"prompts": 8, "samples": 2, "min_solved": 0, "max_solved": 2, "pool": 4, "min_pool": 4},
         "rl": {"prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 8},
         "pilot": {"min_gain": -1.0, "se_k": None, "min_boxed": 0.0, "min_entropy_ratio": 0.0},
         "arms": {"seeds": [0], "sanity_seeds": [0]},
         "verdicts": {"replicates": 200}}


def load_config(path: Path, smoke: bool = False) -> dict:
    """The study's YAML (every section of `SECTIONS`, no other), with the smoke sizes laid over it when `smoke`."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping at the top level, found {type(cfg).__name__}")
    missing, unknown = set(SECTIONS) - set(cfg), set(cfg) - set(SECTIONS)
    if missing or unknown:
        raise SystemExit(f"{path}: missing sections {sorted(missing)}, unknown sections {sorted(unknown)}")
    grid = cfg["sft"]["grid"]
    if grid[0] != 0 or grid != sorted(set(grid)) or grid[-1] != cfg["sft"]["max_steps"]:
        raise SystemExit(f"{path}: sft.grid must start at 0, increase strictly and end at sft.max_steps ({cfg['sft']['max_steps']}), found {grid}")
    if smoke:
        cfg = copy.deepcopy(cfg)
        for section, values in SMOKE.items():
            if isinstance(values, dict):
                cfg[section].update(values)
            else:
                cfg[section] = values
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "real_study.yaml", help="study configuration (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None, help="data, weights and logs (default: the config's paths.work, + -smoke)")
    parser.add_argument("--out", type=Path, default=None, help="unit records and reports (default: the config's paths.out; <work>/results with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, toy sizes: checks that every stage runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preflight", action="store_true", help="only the units that decide the scope: CE seed 0, screen, RL pilot and remedies")
    what.add_argument("--run", action="store_true", help="every unit the records call for")
    what.add_argument("--report", action="store_true", help="results.md / results.json / figures from the unit files alone")
    parser.add_argument("--only", default=None, help="run only units whose id starts with this")
    parser.add_argument("--until", default=None, help="start no unit whose estimate would end after this time (HH:MM UTC or ISO)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.smoke)
    root = HERE.parent
    work = args.work or root / (cfg["paths"]["work"] + ("-smoke" if args.smoke else ""))
    out = args.out or (work / "results" if args.smoke else root / cfg["paths"]["out"])

    from real import stages, study

    stages.quiet(args.threads)
    if args.report:
        print(f"report: {study.report(cfg, out)}")
        return
    began = time.time()
    ran = study.run(cfg, work, out, parse_until(args.until), only=args.only, preflight=args.preflight)
    print(json.dumps({"ran": ran, "wall_minutes": round((time.time() - began) / 60, 2)}))
    print(f"report: {study.report(cfg, out)}")


if __name__ == "__main__":
    main()
