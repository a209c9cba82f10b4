"""The strategy world as units (aesl_lightning.study.units): which units exist, how each runs, and the checks.

Unit ids: `base`, `base-check`, `sft-<coldstart>-<loss>-s<seed>`, `rl-<arm>-s<seed>`, `pilot-rl-<arm>-s<seed>`.
An RL unit's starting snapshot is chosen from its SFT unit's recorded grid by the rules in `rules.py`, so the
choice is made from committed records, never from anything left in the work folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from aesl_lightning.study.units import MachineProbe, Unit, UnitStore, estimate, run_units, strict_json
from world import rules, stages

# arm -> (cold start, SFT loss, which grid point); `rl_only` starts from the base
ARMS = {
    "rl_only": (None, None, "base"),
    "ce_best_acc": ("narrow", "ce", "best_accuracy"),
    "ce_turning": ("narrow", "ce", "turning_point"),
    "ce_end": ("narrow", "ce", "end"),
    "dft_end": ("narrow", "dft", "end"),
    "aesl_end": ("narrow", "aesl", "end"),
    "anchored_end": ("narrow", "aesl_entropy_floor", "end"),
    "best_ce_best_acc": ("best", "ce", "best_accuracy"),
    "best_ce_turning": ("best", "ce", "turning_point"),
}


def config_digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def sft_id(coldstart: str, loss: str, seed: int) -> str:
    return f"sft-{coldstart}-{loss}-s{seed}"


def rl_units(arms: list[str], seeds: list[int], prefix: str = "rl") -> list[Unit]:
    out = []
    for seed in seeds:
        for arm in arms:
            coldstart, loss, _ = ARMS[arm]
            deps = ("base",) if coldstart is None else (sft_id(coldstart, loss, seed),)
            out.append(Unit(f"{prefix}-{arm}-s{seed}", "rl", deps, {"arm": arm, "seed": seed}))
    return out


def sft_units(pairs: list[tuple[str, str]], seeds: list[int]) -> list[Unit]:
    return [Unit(sft_id(c, loss, seed), "sft", ("base",), {"coldstart": c, "loss": loss, "seed": seed}) for seed in seeds for c, loss in pairs]


SECTIONS = {"base": ("world", "base"), "eval": ("world", "base", "eval"), "sft": ("world", "base", "coldstarts", "sft", "eval"),
            "tune": ("world", "base", "coldstarts", "eval"), "rl": ("world", "base", "coldstarts", "sft", "eval", "rl")}


def stamp(cfg: dict, units: list[Unit]) -> list[Unit]:
    """Each unit's params carry the digest of the config sections it depends on, so a record made under other
    settings is never taken for this one (`check_records`)."""
    return [Unit(u.id, u.kind, u.deps, {**u.params, "config": config_digest({k: cfg[k] for k in SECTIONS[u.kind]})}) for u in units]


def check_records(units: list[Unit], store: UnitStore) -> None:
    for u in units:
        if store.done(u.id):
            recorded = store.load(u.id)["params"].get("config")
            if recorded != u.params["config"]:
                raise SystemExit(f"{store.path(u.id)}: recorded under other settings (config {recorded}, now {u.params['config']}); "
                                 "the study's settings changed after this unit ran: restore them, or move the record aside and say so in the plan")


def tuning_units(cfg: dict) -> list[Unit]:
    """Pre-flight tuning runs of the narrow CE cold start (seed 0), each with its own SFT / evaluation settings."""
    out = []
    for name, t in cfg["preflight"].get("sft_tuning", {}).items():
        out.append(Unit(f"tune-sft-{name}", "tune", ("base",), {"coldstart": "narrow", "loss": "ce", "seed": 0, "overrides": t}))
    return out


def with_overrides(cfg: dict, overrides: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    for section, values in overrides.items():
        out[section].update(values)
    return out


def preflight_units(cfg: dict) -> list[Unit]:
    p = cfg["preflight"]
    return ([Unit("base", "base"), Unit("base-check", "eval", ("base",))] + tuning_units(cfg)
            + sft_units([("narrow", "ce")], p["sft_seeds"])
            + rl_units(p["rl_arms"], p["rl_seeds"], prefix="pilot-rl"))


def main_units(cfg: dict) -> list[Unit]:
    """Seed by seed (each seed's SFT units, then its RL units), so a sitting cut short by its deadline leaves whole
    seeds behind; a control arm's seeds can be fewer than the main arms' (`main.control_seeds`)."""
    m = cfg["main"]
    control_seeds = m.get("control_seeds", {})
    out = [Unit("base", "base")]
    for seed in m["seeds"]:
        arms = [a for a in m["arms"] if seed in control_seeds.get(ARMS[a][0], m["seeds"])]
        sft = sorted({(ARMS[a][0], ARMS[a][1]) for a in arms if ARMS[a][0]}
                     | {tuple(x) for x in m.get("sft_only", []) if seed in control_seeds.get(x[0], m["seeds"])},
                     key=lambda pair: (list(cfg["coldstarts"]).index(pair[0]), pair[1]))  # the main world first, then the controls
        out += sft_units(sft, [seed]) + rl_units(arms, [seed])
    return out


def start_of(cfg: dict, work: Path, store: UnitStore, arm: str, seed: int) -> tuple[Path, dict]:
    """The snapshot an arm starts RL from, and why (from the SFT unit's committed grid)."""
    coldstart, loss, which = ARMS[arm]
    if coldstart is None:
        return work / "base", {"rule": "base"}
    record = store.load(sft_id(coldstart, loss, seed))["result"]
    grid = record["grid"]
    if which == "end":
        step, why = grid[-1]["step"], {"rule": "end"}
    elif which == "best_accuracy":
        row = rules.best_accuracy(grid)
        step, why = row["step"], {"rule": "best_accuracy", "greedy_accuracy": row["summary"]["greedy_accuracy"]}
    else:
        tp = rules.turning_point(grid, "paper")
        step = tp["peak_step"] if tp["peak_step"] is not None else grid[-1]["step"]
        why = {"rule": "turning_point", **tp}
    path = work / "runs" / sft_id(coldstart, loss, seed) / "snapshots" / f"step{step:05d}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the snapshot of {sft_id(coldstart, loss, seed)} at step {step} is missing from the work folder; "
                                f"delete {store.path(sft_id(coldstart, loss, seed))} to rerun that SFT unit")
    return path, {"step": step, **why}


def execute(cfg: dict, work: Path, store: UnitStore, unit: Unit) -> dict:
    if unit.kind == "base":
        cached = work / "base" / "train.json"
        if cached.is_file() and json.loads(cached.read_text()).get("config") == config_digest(cfg["base"] | {"world": cfg["world"]}):
            result = {**json.loads(cached.read_text()), "reused": str(cached)}  # weights kept from an earlier attempt of this unit
            return result if "weights" in result else {**result, "weights": keep_base(work, store.dir.parent)}
        result = stages.pretrain_base(cfg, work) | {"config": config_digest(cfg["base"] | {"world": cfg["world"]})}
        result["weights"] = keep_base(work, store.dir.parent)
        cached.write_text(json.dumps(result))
        return result
    if unit.id == "base-check":
        return stages.base_check(cfg, work)
    if unit.kind in ("sft", "tune"):
        p = unit.params
        return stages.run_sft(with_overrides(cfg, p.get("overrides", {})), work, p["coldstart"], p["loss"], p["seed"], unit.id)
    if unit.kind == "rl":
        arm, seed = unit.params["arm"], unit.params["seed"]
        start, why = start_of(cfg, work, store, arm, seed)
        for other_id, other in store.records().items():  # the same start and seed was already trained: same run
            if other.get("kind") == "rl" and not other.get("superseded") and other["result"].get("start") == str(start.relative_to(work)) and other["result"].get("seed") == seed \
                    and other_id.split("-")[0] == unit.id.split("-")[0] and "same_as" not in other["result"]:
                return {**other["result"], "same_as": other_id, "start_rule": why}
        return stages.run_grpo(cfg, work, start, seed, unit.id) | {"start_rule": why}
    raise ValueError(f"unknown unit kind {unit.kind!r}")


def longest_solution(cfg: dict) -> dict:
    """The longest solution, in tokens with its end-of-sequence token, of any strategy in either format over the
    problems the study generates for (validation, RL pool, test), with the strategy and format that give it."""
    from dataclasses import replace

    from aesl_lightning.data.strategy_world import STRATEGIES, Problem, fixed_splits, solution
    from aesl_lightning.infra.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    splits = fixed_splits(replace(stages.world_config(cfg), pretrain_size=0))  # the same problems, no corpus
    problems = {(r["a"], r["b"]) for name in ("val", "rl", "test") for r in splits[name]}
    longest = {"tokens": 0}
    for strategy in STRATEGIES:
        for fmt in ("native", "target"):
            texts = [solution(Problem(a, b), strategy, fmt) for a, b in sorted(problems)]
            tokens = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) + 1
            if tokens > longest["tokens"]:
                longest = {"tokens": tokens, "strategy": strategy, "format": fmt}
    return longest


def check_generation_cap(cfg: dict) -> None:
    """Every strategy must fit the generation cap in either format (amendment 9: a cap of 96 cut every `column`
    solution in the target format before its answer, so neither the evaluations nor RL could ever see one)."""
    longest, cap = longest_solution(cfg), cfg["eval"]["max_new_tokens"]
    if longest["tokens"] > cap:
        raise SystemExit(f"eval.max_new_tokens = {cap} cuts solutions before their answer: a {longest['strategy']} solution in the "
                         f"{longest['format']} format takes up to {longest['tokens']} tokens with its end token; raise the cap")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keep_base(work: Path, out: Path) -> dict:
    """Commit-sized copy of the base (~3 MB) beside the records, with the sha256 of each file in the base record:
    every seed must start from the same base, and training it again on another CPU gives other weights (amendment 10)."""
    kept = out / "base"
    kept.mkdir(parents=True, exist_ok=True)
    files = sorted(p.name for p in (work / "base").iterdir() if p.is_file() and p.name != "train.json")
    for name in files:
        shutil.copy2(work / "base" / name, kept / name)
    return {"folder": str(kept.relative_to(out)), "sha256": {name: _sha256(kept / name) for name in files}}


def seed_of(unit: Unit) -> int | None:
    return unit.params.get("seed") if unit.kind in ("sft", "rl") else None


def whole_seeds(units: list[Unit], store: UnitStore, planned: dict, deadline: float | None, now: float) -> list[Unit]:
    """Under a deadline, start no seed whose pending units would not all finish before it: a seed's RL units start
    from its SFT runs' snapshots, which live in the (uncommitted) work folder, so a seed left half done would have
    to rebuild them in a later sitting, perhaps on another CPU that cannot reproduce them."""
    if deadline is None:
        return units
    records, clock, kept, skipped = store.records(), now, [], set()
    for seed in dict.fromkeys(seed_of(u) for u in units):
        group = [u for u in units if seed_of(u) == seed]
        cost = sum(estimate(u.kind, records, planned) for u in group if not store.done(u.id))
        if seed is not None and clock + cost > deadline:
            skipped.add(seed)
            continue
        clock += cost
        kept += group
    if skipped:
        print(f"[refused] seeds {sorted(skipped)}: their pending units would not all end before the deadline")
    return kept


def _same(summaries: list[dict], recorded: list[dict]) -> bool:
    """Equal after the JSON round trip a record goes through (exact: the stages are deterministic on this machine)."""
    return json.loads(json.dumps(strict_json(summaries), sort_keys=True)) == json.loads(json.dumps(recorded, sort_keys=True))


def _log_restore(out: Path, entry: dict) -> None:
    with open(out / "restores.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(strict_json(entry), sort_keys=True) + "\n")


def restore_missing(cfg: dict, work: Path, out: Path, store: UnitStore, units: list[Unit]) -> list[str]:
    """Weights live in the (git-ignored) work folder and a fresh checkout has none. Before pending units run, rebuild
    what they need: the base from its committed copy (sha256 checked against its record) and the SFT runs whose
    snapshots a pending RL unit starts from, trained again. Each SFT rebuild must reproduce its record's evaluations
    exactly (another CPU may not: amendment 10), else the study stops: later units would otherwise start from
    weights no record describes. Each restore is logged to `<out>/restores.jsonl` (unit, commit, load, seconds,
    whether it matched)."""
    todo = [u for u in units if not store.done(u.id)]
    if not todo:
        return []
    restored = []

    def rebuild(unit_id: str, make, recorded: list[dict]) -> None:
        probe = MachineProbe(Path(__file__).resolve().parents[2])
        ok = _same(make(), recorded)
        _log_restore(out, {"unit": unit_id, "machine": probe.finish(), "matches_record": ok})
        if not ok:
            raise SystemExit(f"{store.path(unit_id)}: rebuilding this unit's weights did not reproduce its recorded evaluations, so the "
                             "pending units would start from weights no record describes; see restores.jsonl and decide in the plan")
        restored.append(unit_id)

    if store.done("base") and not (work / "base" / "config.json").is_file():
        base = store.load("base")["result"]
        if "weights" not in base:
            raise SystemExit(f"{store.path('base')}: the base's weights are neither in the work folder nor kept beside the records; "
                             "a base trained again on this machine need not be the same (amendment 10): supersede the base and rerun the study")
        weights = base["weights"]  # the committed copy, checked file by file
        kept = out / weights["folder"]
        bad = [name for name, digest in weights["sha256"].items() if not (kept / name).is_file() or _sha256(kept / name) != digest]
        if bad:
            raise SystemExit(f"{kept}: {', '.join(bad)} missing or not the recorded file (sha256 in {store.path('base')})")
        (work / "base").mkdir(parents=True, exist_ok=True)
        for name in weights["sha256"]:
            shutil.copy2(kept / name, work / "base" / name)
        (work / "base" / "train.json").write_text(json.dumps({**base, "config": config_digest(cfg["base"] | {"world": cfg["world"]})}))
        _log_restore(out, {"unit": "base", "from": str(kept.relative_to(out)), "matches_record": True, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        restored.append("base")
    for u in todo:
        if u.kind != "rl":
            continue
        coldstart, loss, _ = ARMS[u.params["arm"]]
        sid = None if coldstart is None else sft_id(coldstart, loss, u.params["seed"])
        if sid is None or sid in restored or not store.done(sid):
            continue
        grid = store.load(sid)["result"]["grid"]
        if all((work / "runs" / sid / "snapshots" / f"step{row['step']:05d}" / "config.json").is_file() for row in grid):
            continue
        p = store.load(sid)["params"]
        rebuild(sid, lambda p=p, sid=sid: [row["summary"] for row in stages.run_sft(cfg, work, p["coldstart"], p["loss"], p["seed"], sid)["grid"]],
                [row["summary"] for row in grid])
    return restored


def run(cfg: dict, work: Path, out: Path, units: list[Unit], deadline: float | None, check_cap: bool = True) -> list[str]:
    if check_cap:
        check_generation_cap(cfg)
    store = UnitStore(out)
    units = stamp(cfg, units)
    check_records(units, store)
    work.mkdir(parents=True, exist_ok=True)
    restore_missing(cfg, work, out, store, units)
    units = whole_seeds(units, store, cfg["estimates"], deadline, time.time())
    return run_units(units, store, lambda u: execute(cfg, work, store, u), cfg["estimates"], deadline=deadline,
                     repo=Path(__file__).resolve().parents[2])


def report(cfg: dict, out: Path) -> Path:
    from world import report as rep

    return rep.write(cfg, UnitStore(out), out)
