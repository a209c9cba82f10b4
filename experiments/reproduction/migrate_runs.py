"""One-off: move a reproduction folder's run records from `<out>/runs/` (before the study library) to `<out>/units/`.

    python experiments/reproduction/migrate_runs.py experiments/results/cpu --track cpu
    python experiments/reproduction/migrate_runs.py experiments/results/gpu-smoke --track gpu --smoke

`runs/grpo__aesl-s0.json` (the bare result) becomes `units/grpo-aesl-s0.json`, a UnitStore record of the unit of
that id in the main table's or the ablation's plan: its kind, params and deps, the old file's content unchanged as
`result`, and `machine` from what the old record knew (its `wall_seconds`; `busy`: those runs ran two at a time, so
their times do not set budgets). The track's settings must match the folder's track.json; a file of no planned unit
is an error. The old files are removed once every record is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE.parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from aesl_lightning.study.units import UnitStore  # noqa: E402
from reproduction import ablation, config, study  # noqa: E402


def migrate(out: Path, track: config.Track) -> list[str]:
    """Write `<out>/units/<id>.json` for every `<out>/runs/*.json`, then remove the old files; returns the ids."""
    recorded = json.loads((out / "track.json").read_text())
    if recorded != json.loads(json.dumps(config.dataclasses.asdict(track))):
        raise SystemExit(f"{out / 'track.json'}: made under other settings than track {track.name!r} of the config")
    units = {u.id: u for u in study.plan(track) + ablation.plan(track)}
    store, old = UnitStore(out), sorted((out / "runs").glob("*.json"))
    records = {}
    for path in old:
        unit_id = path.stem.replace("__", "-")
        if unit_id not in units:
            raise SystemExit(f"{path}: no unit {unit_id!r} in the plan of track {track.name!r}")
        unit, result = units[unit_id], json.loads(path.read_text())
        machine = {"seconds": result.get("wall_seconds"), "busy": True, "start": None, "end": None, "other_cores": None,
                   "migrated_from": f"runs/{path.name}", "note": "timed before the study library, two units at a time"}
        records[unit_id] = {"id": unit_id, "kind": unit.kind, "params": dict(unit.params), "deps": list(unit.deps), "machine": machine,
                            "result": result}
    for unit_id, record in records.items():
        if store.done(unit_id):
            raise SystemExit(f"{store.path(unit_id)} exists already: migrated before?")
        store.save(unit_id, record)
    for path in old:
        path.unlink()
    (out / "runs").rmdir()
    return sorted(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the results folder (holds runs/ and track.json)")
    parser.add_argument("--track", default="cpu", help="the track of experiments/reproduce.yaml it was made with")
    parser.add_argument("--smoke", action="store_true", help="it was a --smoke run")
    args = parser.parse_args()
    track = config.load_tracks()[0][args.track]
    print(f"{args.out}: {len(migrate(args.out, track.smoke() if args.smoke else track))} records moved to units/")


if __name__ == "__main__":
    main()
