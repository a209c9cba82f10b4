"""Every number of the reports, from the units' results alone (pure functions: `results` maps a unit id to its
recorded result)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from aesl_lightning.study.report import mean_ci
from aesl_lightning.study.stats import spearman
from aesl_lightning.study.units import Unit
from reproduction.ablation import METHODS
from reproduction.config import Track
from reproduction.study import ARMS, aesl_sweep_id, chosen_tau

SFT_COLUMNS = [("val/answer_accuracy", "val acc"), ("val/gen_entropy", "entropy"), ("val/self_bleu", "self-BLEU"),
               ("val/kl_to_base", "KL to base"), ("val/pass@{k}", "pass@{k}")]


def _cell(values: list) -> dict:
    return {"values": values, "mean_ci": mean_ci(values)}


def arm_summary(track: Track, results: Mapping[str, dict], arm: str) -> dict | None:
    """One arm over its seeds: the SFT row it starts RL from, the test numbers after RL and, when every seed's
    start was evaluated too, before RL and the gain (each as values per seed and mean with its t-interval)."""
    k_val, k_eval = track.val_samples, track.eval_samples
    runs = [dict(results[f"grpo-{arm}-s{s}"]) for s in track.seeds if f"grpo-{arm}-s{s}" in results]
    if not runs:
        return None
    if arm == "base":  # the base model's own validation numbers: the step-0 row of that seed's CE run
        for r in runs:
            ce = results.get(f"sft-ce-s{r['seed']}")
            r["sft_row"] = r["sft_row"] or (ce["history"][0] if ce else None)
    entry = {"seeds": [r["seed"] for r in runs], "sft": {}, "rl": {}}
    for key, _ in SFT_COLUMNS:
        key = key.format(k=k_val)
        entry["sft"][key] = _cell([(r["sft_row"] or {}).get(key) for r in runs])
    entry["sft_step"] = [(r["sft_row"] or {}).get("step") for r in runs]
    for split in ("test", "test_hard"):
        for key in ("greedy_accuracy", "pass@1", f"pass@{k_eval}", "gen_entropy", "self_bleu"):
            entry["rl"][f"{split}/{key}"] = _cell([r["eval"][split].get(key) for r in runs])
    before = [results[f"start_eval-{arm}-s{r['seed']}"] for r in runs if f"start_eval-{arm}-s{r['seed']}" in results]
    if len(before) == len(runs):
        for split in ("test", "test_hard"):
            for key in ("greedy_accuracy", "pass@1", f"pass@{k_eval}"):
                entry["rl"][f"before/{split}/{key}"] = _cell([b["eval"][split].get(key) for b in before])
                entry["rl"][f"gain/{split}/{key}"] = _cell([a["eval"][split].get(key) - b["eval"][split].get(key) for a, b in zip(runs, before)])
    entry["rl"]["frac_reward_zero_std_first_quarter"] = _cell([r["train"].get("first_quarter/frac_reward_zero_std") for r in runs])
    return entry


def sweep_points(track: Track, results: Mapping[str, dict]) -> list[dict]:
    """The checkpoint sweep: each snapshot's SFT validation numbers beside its post-RL test numbers, by unit id."""
    k_val, k_eval = track.val_samples, track.eval_samples
    points = []
    for unit_id in sorted(k for k in results if k.startswith("sweep-")):
        r = results[unit_id]
        row, test = r["sft_row"], r["eval"]["test"]
        points.append({"step": row["step"], "sft_accuracy": row.get("val/answer_accuracy"), "sft_entropy": row.get("val/gen_entropy"),
                       "sft_self_bleu": row.get("val/self_bleu"), "sft_pass@k": row.get(f"val/pass@{k_val}"),
                       "rl_pass@1": test.get("pass@1"), "rl_greedy": test.get("greedy_accuracy"), f"rl_pass@{k_eval}": test.get(f"pass@{k_eval}")})
    return points


def sweep_correlations(track: Track, sweep: list[dict]) -> dict:
    """{subset: {SFT predictor: {post-RL metric: Spearman rho}}} over all snapshots and over SFT snapshots only
    (step > 0), each with at least 3 points; -self-BLEU so that every predictor grows with diversity or accuracy."""
    k_val, k_eval = track.val_samples, track.eval_samples
    correlations = {}
    for subset, points in (("all snapshots", sweep), ("SFT snapshots only (step > 0)", [s for s in sweep if s["step"] > 0])):
        if len(points) >= 3:
            correlations[subset] = {
                name: {post: spearman([sign * s[key] for s in points], [s[post] for s in points])
                       for post in ("rl_pass@1", f"rl_pass@{k_eval}", "rl_greedy")}
                for name, key, sign in (("SFT accuracy", "sft_accuracy", 1), ("SFT entropy", "sft_entropy", 1),
                                        ("SFT -self-BLEU", "sft_self_bleu", -1), (f"SFT pass@{k_val}", "sft_pass@k", 1))}
    return correlations


def summarise(track: Track, results: Mapping[str, dict]) -> dict:
    """The main table: every arm, the checkpoint sweep and its correlations, the AESL threshold choice, the base."""
    arms = {arm: entry for arm in ARMS if (entry := arm_summary(track, results, arm)) is not None}
    sweep = sweep_points(track, results)
    aesl = None
    if all(aesl_sweep_id(t, track.seeds[0]) in results for t in track.aesl_taus):
        tau, rows = chosen_tau(track, results)
        aesl = {"chosen_tau": tau, "sweep": rows}
    return {"track": dataclasses.asdict(track), "arms": arms, "sweep": sweep, "correlations": sweep_correlations(track, sweep),
            "aesl_selection": aesl, "base": results.get("base")}


def ablation_summary(track: Track, units: Sequence[Unit], results: Mapping[str, dict]) -> dict:
    """The ablation's cells from the finished ones among the planned `units`: per set size and difficulty, each
    method's post-RL numbers and SFT row over seeds, and AESL - CE pass@1 paired by seed."""
    k = track.eval_samples
    planned = [u for u in units if u.kind == "ablation"]
    finished = [u for u in planned if u.id in results]
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for u in finished:
        cells.setdefault((u.params["size"], u.params["difficulty"]), {}).setdefault(u.params["method"], []).append(results[u.id])
    table = {}
    for (size, difficulty), methods in sorted(cells.items()):
        row = {}
        for method in METHODS:
            got = methods.get(method, [])
            row[method] = {"seeds": sorted(r["seed"] for r in got),
                           "pass@1": mean_ci([r["eval"].get("pass@1") for r in got]),
                           f"pass@{k}": mean_ci([r["eval"].get(f"pass@{k}") for r in got]),
                           "sft_accuracy": mean_ci([r["sft_row"].get("val/answer_accuracy") for r in got]),
                           "sft_entropy": mean_ci([r["sft_row"].get("val/gen_entropy") for r in got]),
                           "sft_steps": sorted(r["sft_row"].get("step") for r in got)}
        by_seed = {m: {r["seed"]: r["eval"].get("pass@1") for r in methods.get(m, [])} for m in METHODS}
        paired = sorted(set(by_seed["ce_best_acc"]) & set(by_seed["aesl"]))
        row["aesl_minus_ce_pass@1"] = mean_ci([by_seed["aesl"][s] - by_seed["ce_best_acc"][s] for s in paired])
        table[f"{size}/{difficulty}"] = row
    taus = sorted({r["tau"] for methods in cells.values() for r in methods.get("aesl", []) if r.get("tau") is not None})
    return {"table": table, "taus": taus, "seeds_done": sorted({u.params["seed"] for u in finished}), "finished": len(finished),
            "planned": len(planned), "cells": sorted(cells)}
