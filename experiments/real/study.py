"""The real study as units (aesl_lightning.study.units): which units exist given the records so far, how each runs.

Units, in the order they run (plan amendment 1: C1 seeds first, then the pilot, then the RL arms seed by seed):
`base-test`; `sft-ce-s<seed>` (C1); `screen`; `pilot-rl`, then its remedies only when the recorded pilots fail; if
no pilot passes, the extra C1 seeds; if one passes, per seed `sft-aesl-s<seed>` and `rl-<arm>-s<seed>` for the
verdict arms, then `rl-rl_only-s0` (sanity arm) and, with `arms.dft`, `sft-dft-s<seed>` + `rl-dft_end-s<seed>`.
An RL unit is listed once its starting snapshot is decided by records (`start_of`); one that would repeat a
recorded run (same start, seed and RL settings, e.g. the passing pilot) reuses it (kind `reuse`).
The SFT snapshots live in the git-ignored work folder; when a unit's start is missing there (a new machine), `run`
rebuilds it from the SFT unit's record and checks it against that record (`restore_missing`) before the unit runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from aesl_lightning.study.units import Unit, UnitStore, estimate, run_units
from real import analysis, rules, stages

# arm -> (SFT unit prefix, which snapshot); `rl_only` starts from the base
ARMS = {"rl_only": (None, "base"), "ce_best_acc": ("sft-ce", "best_accuracy"), "ce_turning": ("sft-ce", "turning_point"),
        "aesl_end": ("sft-aesl", "end"), "dft_end": ("sft-dft", "end")}
# what each kind of unit depends on: config sections, and the C1 rule's fields that choose snapshots
SECTIONS = {"base-test": ("model", "data", "eval"), "sft-grid": ("model", "data", "sft", "eval"), "sft-end": ("model", "data", "sft", "eval"),
            "screen": ("model", "data", "sft", "eval", "screen"), "rl": ("model", "data", "sft", "eval", "screen", "rl")}
RULE_FIELDS = {"base-test": (), "sft-grid": ("format_level",), "sft-end": (), "screen": ("format_level",),
               "rl": ("format_level", "noise_k", "se_replicates")}


def config_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def rl_kind(settings: dict, cfg: dict, base: bool) -> str:
    passes = settings.get("passes", cfg["rl"]["passes"])
    return "rl" + ("-base" if base else "") + (f"-{passes}pass" if passes != cfg["rl"]["passes"] else "")


def start_of(cfg: dict, records: dict, arm: str, seed: int) -> dict | None:
    """Where an arm's RL starts, decided from the SFT unit's record: `{"label", "sft", "step", "rule"}`; None while that
    record is missing."""
    prefix, which = ARMS[arm]
    if prefix is None:
        return {"label": "base", "sft": None, "step": None, "rule": "base"}
    sft_id = f"{prefix}-s{seed}"
    if sft_id not in records:
        return None
    grid = records[sft_id]["result"]["grid"]
    if which == "end":
        step, why = grid[-1]["step"], {}
    elif which == "best_accuracy":
        row = rules.best_accuracy(grid)
        step, why = row["step"], {"greedy_accuracy": row["summary"]["greedy_accuracy"]}
    else:
        c = cfg["c1"]
        tp = rules.turning_point(grid, c["format_level"], c["noise_k"], c["se_replicates"])
        step = tp["peak_step"] if tp["peak_step"] is not None else grid[-1]["step"]
        why = {k: tp[k] for k in ("peak_step", "detected", "format_step", "reason")}
    return {"label": f"{sft_id}@step{step:05d}", "sft": sft_id, "step": step, "rule": which, **why}


def _rl_unit(cfg: dict, records: dict, unit_id: str, arm: str, seed: int, settings: dict) -> Unit | None:
    start = start_of(cfg, records, arm, seed)
    if start is None:
        return None
    deps = tuple(d for d in (start["sft"], "screen") if d) + (("base-test",) if arm == "rl_only" else ())
    effective = {**cfg["rl"], **settings}
    kind = rl_kind(settings, cfg, arm == "rl_only")
    for other_id, other in records.items():  # the same start, seed and settings already ran: the same run
        r = other["result"]
        if other_id != unit_id and other["kind"].startswith("rl") and r.get("start") == start["label"] and r.get("seed") == seed \
                and r.get("settings") == effective and "same_as" not in r:
            kind = "reuse"
    return Unit(unit_id, kind, deps, {"arm": arm, "seed": seed, "settings": settings, "start": start})


def study_units(cfg: dict, records: dict, preflight: bool = False) -> list[Unit]:
    """Every unit the records so far call for (module docstring); `preflight`: only those that decide the scope."""
    c1 = cfg["c1"]
    ce = lambda s: Unit(f"sft-ce-s{s}", "sft-grid", (), {"loss": cfg["sft"]["losses"]["ce"], "seed": s})  # noqa: E731
    units = [] if preflight else [Unit("base-test", "base-test")] + [ce(s) for s in c1["seeds"]]
    units += [ce(c1["seeds"][0])] if preflight else []
    units.append(Unit("screen", "screen", (f"sft-ce-s{c1['seeds'][0]}",)))
    decision = analysis.pilot_decision(records, cfg)
    for unit_id, settings in decision["units"].items():
        unit = _rl_unit(cfg, records, unit_id, "ce_best_acc", c1["seeds"][0], settings)
        if unit is not None:
            units.append(unit)
    if preflight:
        return units
    if decision["status"] == "failed":
        units += [ce(s) for s in c1["extra_seeds"]]
    if decision["status"] != "passed":
        return units
    a = cfg["arms"]
    later = []
    for seed in a["seeds"]:
        units.append(Unit(f"sft-aesl-s{seed}", "sft-end", (), {"loss": cfg["sft"]["losses"]["aesl"], "seed": seed}))
        units += [u for arm in a["verdict_arms"] if (u := _rl_unit(cfg, records, f"rl-{arm}-s{seed}", arm, seed, decision["settings"]))]
        if a["dft"]:
            later.append(Unit(f"sft-dft-s{seed}", "sft-end", (), {"loss": cfg["sft"]["losses"]["dft"], "seed": seed}))
            later += [u for u in [_rl_unit(cfg, records, f"rl-dft_end-s{seed}", "dft_end", seed, decision["settings"])] if u]
    units += [u for s in a["sanity_seeds"] if (u := _rl_unit(cfg, records, f"rl-rl_only-s{s}", "rl_only", s, decision["settings"]))]
    return units + later


def stamp(cfg: dict, units: list[Unit]) -> list[Unit]:
    """Each unit's params carry the digest of the config sections it depends on and of its own params, so a record made
    under other settings is never taken for this one (`check_records`)."""
    out = []
    for u in units:
        section = "rl" if u.kind.startswith("rl") or u.kind == "reuse" else u.kind
        inputs = {"config": {k: cfg[k] for k in SECTIONS[section]}, "c1": {k: cfg["c1"][k] for k in RULE_FIELDS[section]}, "unit": dict(u.params)}
        digest = config_digest(inputs)
        out.append(Unit(u.id, u.kind, u.deps, {**u.params, "config": digest}))
    return out


def check_records(units: list[Unit], store: UnitStore) -> None:
    for u in units:
        if store.done(u.id):
            recorded = store.load(u.id)["params"].get("config")
            if recorded != u.params["config"]:
                raise SystemExit(f"{store.path(u.id)}: recorded under other settings (config {recorded}, now {u.params['config']}); "
                                 "the study's settings changed after this unit ran: restore them, or move the record aside and say so in the plan")


def needed_snapshot(unit: Unit, records: dict) -> tuple[str, int] | None:
    """The SFT snapshot `(unit id, step)` a screen or RL unit starts from; None for the others (and RL from the base)."""
    if unit.kind == "screen":
        return unit.deps[0], rules.best_accuracy(records[unit.deps[0]]["result"]["grid"])["step"]
    if unit.kind.startswith("rl") and unit.params["start"]["sft"] is not None:
        return unit.params["start"]["sft"], unit.params["start"]["step"]
    return None


def _missing(work: Path, need: tuple[str, int] | None) -> bool:
    return need is not None and not (stages.snapshot_dir(work, *need) / "config.json").is_file()


def restore_missing(cfg: dict, work: Path, store: UnitStore, unit: Unit, pending: list[Unit], log=print) -> None:
    """If `unit` starts from an SFT snapshot that is not in the work folder, rebuild it (`stages.restore_sft`) together
    with the other missing snapshots of the same SFT run that `pending` units start from (one run up to the latest)."""
    records = store.records()
    need = needed_snapshot(unit, records)
    if not _missing(work, need):
        return
    sft_id = need[0]
    others = [needed_snapshot(u, records) for u in pending]
    steps = sorted({need[1]} | {n[1] for n in others if _missing(work, n) and n[0] == sft_id})
    log(f"[restore] {sft_id} steps {steps}: snapshots missing from {work} (rebuilt and checked against the record)")
    stages.restore_sft(cfg, work, sft_id, records[sft_id]["result"], steps, log=log)


def restore_seconds(records: dict, unit: Unit, work: Path) -> float:
    """A bound on `restore_missing`'s time for `unit`: the recorded SFT run's training time, all of it (0 if nothing is
    missing)."""
    need = needed_snapshot(unit, records)
    if not _missing(work, need):
        return 0.0
    r = records[need[0]]["result"]
    return float(r["seconds"] - r["eval_seconds"])


def execute(cfg: dict, work: Path, store: UnitStore, unit: Unit) -> dict:
    p = unit.params
    if unit.kind == "base-test":
        return stages.base_test(cfg, work)
    if unit.kind == "sft-grid":
        return stages.run_sft(cfg, work, unit.id, p["loss"], p["seed"], cfg["sft"]["grid"])
    if unit.kind == "sft-end":
        return stages.run_sft(cfg, work, unit.id, p["loss"], p["seed"], [cfg["sft"]["max_steps"]])
    records = store.records()
    if unit.kind == "screen":
        sft_id, step = needed_snapshot(unit, records)
        path = stages.snapshot_dir(work, sft_id, step)
        return {"start": f"{sft_id}@step{step:05d}", **stages.run_screen(cfg, work, path), **_restored(path)}
    start = p["start"]
    if unit.kind == "reuse":
        effective = {**cfg["rl"], **p["settings"]}
        other_id, other = next((i, r) for i, r in records.items() if r["kind"].startswith("rl") and r["result"].get("start") == start["label"]
                               and r["result"].get("seed") == p["seed"] and r["result"].get("settings") == effective and "same_as" not in r["result"])
        return {**other["result"], "same_as": other_id, "start_rule": start}
    path = stages.model_source(cfg, work) if start["sft"] is None else stages.snapshot_dir(work, start["sft"], start["step"])
    if start["sft"] is not None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the snapshot of {start['sft']} at step {start['step']} is missing from the work folder; "
                                f"move {store.path(start['sft'])} aside to rerun that SFT unit")
    start_test = records["base-test"]["result"]["test"] if start["sft"] is None and "base-test" in records else None
    result = stages.run_grpo(cfg, work, unit.id, str(path), p["seed"], p["settings"], records["screen"]["result"]["pool"], start_test)
    return {**result, "start": start["label"], "start_rule": start, **(_restored(path) if start["sft"] is not None else {})}


def _restored(snapshot: Path) -> dict:
    """`{"start_restored": check}` when the starting snapshot was rebuilt by `stages.restore_sft`."""
    marker = snapshot / stages.RESTORED
    return {"start_restored": json.loads(marker.read_text())} if marker.is_file() else {}


def run(cfg: dict, work: Path, out: Path, deadline: float | None, only: str | None = None, preflight: bool = False,
        log=print) -> list[str]:
    """Run the units the records call for, one at a time, listing them again after each (a finished pilot schedules
    what follows; a unit that would repeat a recorded run becomes a reuse), until nothing more can start. Returns the
    ids run."""
    store = UnitStore(out)
    work.mkdir(parents=True, exist_ok=True)
    ran: list[str] = []
    while True:
        units = stamp(cfg, study_units(cfg, store.records(), preflight))
        check_records(units, store)
        waiting = []
        for u in units:
            if store.done(u.id) or (only and not u.id.startswith(only)):
                continue
            if not all(store.done(d) for d in u.deps):
                waiting.append(f"[skip] {u.id}: waits for {', '.join(d for d in u.deps if not store.done(d))}")
                continue
            extra = restore_seconds(store.records(), u, work)
            if extra and deadline is not None and time.time() + extra + estimate(u.kind, store.records(), cfg["estimates"]) > deadline:
                log(f"[refused] {u.id}: rebuilding its start (~{extra / 60:.1f} min) and the unit would end after the deadline")
                continue
            pending = [v for v in units if not store.done(v.id) and (not only or v.id.startswith(only)) and all(store.done(d) for d in v.deps)]
            restore_missing(cfg, work, store, u, pending, log=log)
            if run_units([u], store, lambda x: execute(cfg, work, store, x), cfg["estimates"], deadline=deadline, log=log,
                         repo=Path(__file__).resolve().parents[2]):
                ran.append(u.id)
                break
        else:
            for line in waiting:
                log(line)
            return ran


def report(cfg: dict, out: Path) -> Path:
    from real import report as rep

    return rep.write(cfg, UnitStore(out), out)
