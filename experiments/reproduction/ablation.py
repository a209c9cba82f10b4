"""The ablation: cold-start set size x difficulty, CE (best validation accuracy) against AESL, on the track's base
model, data and GRPO budget (its units share the track's folders and records)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from aesl_lightning.study.units import Unit
from reproduction import stages
from reproduction.config import Paths, Track
from reproduction.study import aesl_sweep, best_accuracy_row, chosen_tau, shared_units

SIZES = (32, 128, 512)
DIFFICULTIES = ("easy", "hard")
METHODS = ("ce_best_acc", "aesl")


def plan(track: Track) -> list[Unit]:
    """The shared units, the main table's AESL sweep (AESL takes its threshold) and one unit per cell and seed."""
    units, base = shared_units(track)
    sweep = aesl_sweep(track, base)
    sweep_ids = tuple(u.id for u in sweep)
    units += sweep
    sizes, seeds = ((8, 16), track.seeds[:1]) if track.smoke_run else (SIZES, track.seeds)
    for seed in seeds:  # seed outermost: an interrupted ablation holds whole seeds of the table
        for size in sizes:
            for difficulty in DIFFICULTIES:
                for method in METHODS:
                    params = {"size": size, "difficulty": difficulty, "seed": seed, "method": method}
                    deps = base + (sweep_ids if method == "aesl" else ())
                    units.append(Unit(f"ablation-{method}-n{size}-{difficulty}-s{seed}", "ablation", deps, params))
    return units


def run_cell(track: Track, paths: Paths, results: Mapping[str, dict], unit: Unit) -> dict:
    """One cell: a cold-start set of the given size and difficulty, SFT (CE keeping the best-accuracy snapshot, or
    AESL with the threshold the main table chose on its validation split), the main table's GRPO budget, test on that
    difficulty. Every set size gets the same number of optimiser steps as the main table's SFT runs."""
    from aesl_lightning.data.synthetic import generate_arithmetic, read_jsonl, write_jsonl

    p = unit.params
    task = track.task if p["difficulty"] == "easy" else track.hard_task
    cell_dir = paths.run_dir(unit.id)
    data_dir = cell_dir / "data"
    exclude = [r for name in ("val", "test", "test_hard", "rl") for r in read_jsonl(paths.data / f"{name}.jsonl")]
    style = (track.coldstart_style,)
    coldstart = generate_arithmetic(task.config(num_examples=p["size"], seed=track.data_seed + 1000 + p["size"], solution_styles=style), exclude)
    val = generate_arithmetic(task.config(num_examples=track.num_val, seed=track.data_seed + 2000, solution_styles=style), exclude + coldstart)
    write_jsonl(coldstart, data_dir / "coldstart.jsonl")
    write_jsonl(val, data_dir / "val.jsonl")
    steps_per_epoch = math.ceil(track.num_coldstart / track.sft_batch)
    ce = p["method"] == "ce_best_acc"
    loss, tau = ("ce", None) if ce else ("aesl", chosen_tau(track, results)[0])
    sft_dir = cell_dir / "sft"
    sft = stages.run_sft(track, run_dir=sft_dir, data_dir=data_dir, base=stages.base_name(track, paths), loss=loss, seed=p["seed"], tau=tau,
                         snapshots=ce, max_steps=track.sft_epochs * steps_per_epoch, val_every_steps=track.val_every_epochs * steps_per_epoch)
    if ce:
        row = best_accuracy_row(sft["history"])
        start = sft_dir / "snapshots" / f"step{row['step']:05d}"
    else:
        row, start = sft["history"][-1], sft_dir / "final"
    split = "test" if p["difficulty"] == "easy" else "test_hard"
    grpo = stages.run_grpo(track, run_dir=cell_dir / "grpo", data_dir=paths.data, start=str(start), seed=p["seed"], steps=track.grpo_steps,
                           splits=(split,))
    return {**p, "tau": tau, "sft_row": row, "eval": grpo["eval"][split], "train": {k: v for k, v in grpo["train"].items() if k != "per_step"}}
