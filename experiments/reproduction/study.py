"""The reproduction as units (aesl_lightning.study): which units exist, where each arm starts RL from, and how a
unit runs in a worker process.

Unit ids: `data`, `base`, `sft-<loss>-s<seed>` (`sft-aesl-tau<tau>-s<seed>`: the threshold sweep), `grpo-<arm>-s<seed>`,
`start_eval-<arm>-s<seed>`, `sweep-snapshot<index>`, `ablation-<method>-n<size>-<difficulty>-s<seed>`. A unit's weights
and logs live in `<work>/<kind>/<rest of the id>`. Every choice (the AESL threshold, a starting checkpoint) is made
from the recorded results alone.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from aesl_lightning.study.schedule import run_units_pool
from aesl_lightning.study.units import Unit
from reproduction import stages
from reproduction.config import Paths, Track

ARMS = ("base", "ce_best_acc", "ce_end", "ce_turning_point", "dft", "aesl")


def best_accuracy_row(history: list[dict]) -> dict:
    """The first SFT validation (step > 0: not the starting model) with the highest greedy answer accuracy
    (ties: the earlier, as ModelCheckpoint)."""
    trained = [r for r in history if r["step"] > 0] or history
    best = max(r.get("val/answer_accuracy", float("-inf")) for r in trained)
    return next(r for r in trained if r.get("val/answer_accuracy", float("-inf")) == best)


def aesl_sweep_id(tau: float, seed: int) -> str:
    return f"sft-aesl-tau{tau:g}-s{seed}"


def chosen_tau(track: Track, results: Mapping[str, dict]) -> tuple[float, list[dict]]:
    """AESL threshold (tau_tok = tau_seq) with the best final validation answer accuracy on the first seed (ties:
    higher sampling entropy), and the sweep's rows. Only the validation split is looked at."""
    rows = []
    for tau in track.aesl_taus:
        final = results[aesl_sweep_id(tau, track.seeds[0])]["history"][-1]
        rows.append({"tau": tau, "val/answer_accuracy": final.get("val/answer_accuracy"), "val/gen_entropy": final.get("val/gen_entropy"),
                     "val/self_bleu": final.get("val/self_bleu"), "val/pass@1": final.get("val/pass@1")})
    best = max(rows, key=lambda r: (r["val/answer_accuracy"] or 0.0, r["val/gen_entropy"] or 0.0))
    return best["tau"], rows


def sft_of(track: Track, results: Mapping[str, dict], arm: str, seed: int) -> str:
    """The SFT unit an arm's starting point comes from (not for `base`)."""
    if arm == "aesl":
        return aesl_sweep_id(chosen_tau(track, results)[0], seed) if seed == track.seeds[0] else f"sft-aesl-s{seed}"
    return f"sft-dft-s{seed}" if arm == "dft" else f"sft-ce-s{seed}"


def starting_point(track: Track, paths: Paths, results: Mapping[str, dict], arm: str, seed: int) -> tuple[str, dict | None]:
    """(model folder to start RL from, the SFT validation row of that checkpoint; None for the base model)."""
    if arm == "base":
        return stages.base_name(track, paths), None
    sft_id = sft_of(track, results, arm, seed)
    history, run_dir = results[sft_id]["history"], paths.run_dir(sft_id)
    if arm == "ce_best_acc":
        row = best_accuracy_row(history)
        return str(run_dir / "snapshots" / f"step{row['step']:05d}"), row
    if arm == "ce_turning_point":
        step = results[sft_id]["turning_point"]["step"]
        return str(run_dir / "turning_point" / "hf_model"), next(r for r in history if r["step"] == step)
    return str(run_dir / "final"), history[-1]


def shared_units(track: Track) -> tuple[list[Unit], tuple[str, ...]]:
    """The data and the base model (CPU track); and what an SFT unit waits for."""
    if track.base_model is None:
        return [Unit("data", "data"), Unit("base", "base", ("data",))], ("base",)
    return [Unit("data", "data")], ("data",)


def aesl_sweep(track: Track, base: tuple[str, ...]) -> list[Unit]:
    """The AESL threshold sweep on the first seed, from which `chosen_tau` picks on validation."""
    first = track.seeds[0]
    return [Unit(aesl_sweep_id(tau, first), "sft", base, {"loss": "aesl", "seed": first, "tau": tau}) for tau in track.aesl_taus]


def plan(track: Track) -> list[Unit]:
    """The main table's units, each after its dependencies."""
    units, base = shared_units(track)
    sweep = aesl_sweep(track, base)
    sweep_ids = tuple(u.id for u in sweep)
    first = track.seeds[0]
    units += [Unit(f"sft-ce-s{seed}", "sft", base, {"loss": "ce", "seed": seed, "snapshots": True}) for seed in track.seeds]
    units += sweep
    units += [Unit(f"sft-dft-s{seed}", "sft", base, {"loss": "dft", "seed": seed}) for seed in track.seeds]
    units += [Unit(f"sft-aesl-s{seed}", "sft", sweep_ids, {"loss": "aesl", "seed": seed, "tau": "chosen"}) for seed in track.seeds[1:]]

    def arm_deps(arm: str, seed: int) -> tuple[str, ...]:
        ce = (f"sft-ce-s{seed}",)
        return {"base": base, "ce_best_acc": ce, "ce_end": ce, "ce_turning_point": ce, "dft": (f"sft-dft-s{seed}",),
                "aesl": sweep_ids + ((f"sft-aesl-s{seed}",) if seed != first else ())}[arm]

    for kind in ("grpo", "start_eval"):  # start_eval: the same starting points before RL, on the same test splits (the RL gain)
        units += [Unit(f"{kind}-{arm}-s{seed}", kind, arm_deps(arm, seed), {"arm": arm, "seed": seed}) for seed in track.seeds for arm in ARMS]
    num_validations = 1 + track.sft_epochs // track.val_every_epochs  # step 0 (the base model) included
    units += [Unit(f"sweep-snapshot{index:02d}", "sweep", (f"sft-ce-s{first}",), {"index": index, "seed": first})
              for index in range(0, num_validations, track.sweep_every)]
    return units


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "transformers",
                 "aesl_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def execute(track: Track, paths: Paths, threads: int, unit: Unit, slots: int) -> dict:
    """Run one unit in a worker process (`threads` torch threads per pool slot it holds) and return its result."""
    import torch

    torch.set_num_threads(threads * slots)
    _quiet()
    p = unit.params
    if unit.kind == "data":
        return stages.make_data(track, paths)
    if unit.kind == "base":
        return stages.make_base(track, paths)
    results = {k: r["result"] for k, r in paths.store.records().items()}
    run_dir = paths.run_dir(unit.id)
    if unit.kind == "sft":
        tau = chosen_tau(track, results)[0] if p.get("tau") == "chosen" else p.get("tau")
        return stages.run_sft(track, run_dir=run_dir, data_dir=paths.data, base=stages.base_name(track, paths), loss=p["loss"],
                              seed=p["seed"], tau=tau, snapshots=p.get("snapshots", False))
    if unit.kind in ("grpo", "start_eval"):
        start, row = starting_point(track, paths, results, p["arm"], p["seed"])
        if unit.kind == "grpo":
            result = stages.run_grpo(track, run_dir=run_dir, data_dir=paths.data, start=start, seed=p["seed"], steps=track.grpo_steps)
        else:
            result = stages.run_start_eval(track, run_dir=run_dir, data_dir=paths.data, start=start, seed=p["seed"])
        return {**result, "arm": p["arm"], "sft_row": row}
    if unit.kind == "sweep":
        ce = f"sft-ce-s{p['seed']}"
        row = results[ce]["history"][p["index"]]
        start = str(paths.run_dir(ce) / "snapshots" / f"step{row['step']:05d}")
        result = stages.run_grpo(track, run_dir=run_dir, data_dir=paths.data, start=start, seed=p["seed"], steps=track.sweep_grpo_steps,
                                 splits=("test",))
        return {**result, "sft_row": row}
    if unit.kind == "ablation":
        from reproduction.ablation import run_cell

        return run_cell(track, paths, results, unit)
    raise ValueError(f"unknown unit kind {unit.kind!r}")


def run(track: Track, paths: Paths, units: list[Unit], planned: Mapping[str, float], workers: int, threads: int,
        deadline: float | None = None) -> list[str]:
    """Every unit not yet recorded, `workers` at a time (`threads` torch threads each; a unit alone gets them all)."""
    return run_units_pool(units, paths.store, functools.partial(execute, track, paths, threads), planned, workers=workers,
                          deadline=deadline, repo=Path(__file__).resolve().parents[2])
