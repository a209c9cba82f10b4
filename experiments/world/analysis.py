"""The strategy world's numbers from unit records alone: pre-flight checks M1-M4, unit costs, C1-C3 (pure functions).

Thresholds are the plan's (plan.md, "Checks" and "Verdict rules"); changing one after the main runs started is a
change of plan and is said so in results.md.
"""

from __future__ import annotations

import math
from statistics import median

import numpy as np

from aesl_lightning.study import stats
from world import rules

M1_MIN_SHARE, M1_MIN_SPREAD, M1_ROUND_BELOW_BEST = 0.15, 0.15, 0.10
M2_MAX_TARGET = 0.02
M3_FORMAT_BY_STEP, M3_MAX_OTHER_AT_END, M3_MAX_SUCCESS_LOSS = 16, 0.10, 0.10
M3B_PASS1 = (0.1, 0.9)  # amendment 2: k-sample accuracy at the first gated grid point, so RL has signal
M4_MIN_GAIN = 0.03
SESOI_ACCURACY = 0.03  # smallest effect of interest on test accuracy after RL (3 points)
SESOI_BITS = 0.10      # smallest effect of interest on strategy entropy (bits)
COMPARISONS = {        # name -> (A, B, claim): "A beats B"
    "C2: turning point vs best accuracy": ("ce_turning", "ce_best_acc"),
    "C2': turning point vs CE end": ("ce_turning", "ce_end"),
    "C3: AESL vs CE best accuracy": ("aesl_end", "ce_best_acc"),
    "C3': AESL vs CE end": ("aesl_end", "ce_end"),
    "anchored AESL vs CE best accuracy": ("anchored_end", "ce_best_acc"),
    "DFT vs CE best accuracy": ("dft_end", "ce_best_acc"),
    "control (best strategy): turning point vs best accuracy": ("best_ce_turning", "best_ce_best_acc"),
}


def check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def m1_m2(base_check: dict) -> dict:
    s = base_check["summary"]
    shares = {k: v for k, v in s["strategy_shares"].items() if k != "other"}
    success = {k: v["success"] for k, v in s["strategy_success"].items()}
    known = [v for v in success.values() if v is not None]
    spread = max(known) - min(known) if len(known) == len(success) else None
    round_gap = None if None in (success.get("column"), success.get("round")) else max(known) - success["round"]
    m1 = min(shares.values()) >= M1_MIN_SHARE and spread is not None and spread >= M1_MIN_SPREAD and round_gap >= M1_ROUND_BELOW_BEST
    return {"M1": {"shares": s["strategy_shares"], "success": success, "spread": spread, "best_minus_round": round_gap, "pass": bool(m1)},
            "M2": {"target_rate": s["target_rate"], "pass": s["target_rate"] <= M2_MAX_TARGET}}


BASE_MIN_ROUND_SUCCESS = 0.5  # amendment 5: the cold start's strategy must be usable, so CE leaves RL a signal


def choose_base(checks: list[dict]) -> int | None:
    """Amendment 5: the step of the first snapshot (in training order) whose base check passes M1 and M2 and whose
    `round` success is >= BASE_MIN_ROUND_SUCCESS; None if none does."""
    for c in sorted(checks, key=lambda c: c["step"]):
        m = m1_m2({"summary": c["summary"]})
        if m["M1"]["pass"] and m["M2"]["pass"] and (m["M1"]["success"].get("round") or 0.0) >= BASE_MIN_ROUND_SUCCESS:
            return c["step"]
    return None


def m3(sft: dict, coldstart_strategy: str = "round") -> dict:
    """Format learned early, the other strategies (nearly) gone at the end, and no degeneration: the cold-start
    strategy's success (right value, any format) at the end is at least its success at step 0 minus 0.1."""
    grid = sft["grid"]
    gated = rules.gated(grid)
    format_step = gated[0]["step"] if gated else None
    end = grid[-1]["summary"]["strategy_shares"]
    other = sum(v for k, v in end.items() if k != coldstart_strategy)
    success = [row["summary"]["strategy_success"][coldstart_strategy]["success"] for row in (grid[0], grid[-1])]
    intact = None not in success and success[1] >= success[0] - M3_MAX_SUCCESS_LOSS
    ok = format_step is not None and format_step <= M3_FORMAT_BY_STEP and other <= M3_MAX_OTHER_AT_END and intact
    pass1 = gated[0]["summary"]["pass@1"] if gated else None
    m3b = pass1 is not None and M3B_PASS1[0] <= pass1 <= M3B_PASS1[1]
    return {"format_step": format_step, "end_shares": end, "end_not_coldstart_share": other, "success_start_end": success,
            "end_target_rate": grid[-1]["summary"].get("target_rate"), "pass": bool(ok),
            "pass1_at_format_step": pass1, "end_pass1": grid[-1]["summary"]["pass@1"], "M3b": bool(m3b)}


def passes(rl: dict, pool_size: int, per_step: int) -> dict:
    """Each prompt's mean reward in pass 1 and pass 2 over the fixed pool (paired by prompt)."""
    steps_per_pass = pool_size // per_step
    seen: list[dict] = [{}, {}]
    for i, batch in enumerate(rl["per_step"]):
        p = i // steps_per_pass
        if p < 2:
            for x in batch:
                seen[p][(x["a"], x["b"])] = x["reward"]
    keys = sorted(set(seen[0]) & set(seen[1]))
    d = [seen[1][k] - seen[0][k] for k in keys]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"prompts": n, "pass1": sum(seen[0][k] for k in keys) / n if n else None, "pass2": sum(seen[1][k] for k in keys) / n if n else None,
            "gain": mean, "se": se}


def moved(p: dict) -> bool:
    """The plan's manipulation check for one RL unit: the training reward rose from pass 1 to pass 2 by more than
    2 standard errors (paired by prompt)."""
    return bool(p["gain"] > 0 and not math.isnan(p["se"]) and p["gain"] > 2 * p["se"])


def rl_gain(records: dict, arm: str, seeds: list[int]) -> dict | None:
    """Test accuracy after RL minus before RL (the start checkpoint), paired by seed and problem."""
    before, after = [], []
    for s in seeds:
        r = records.get(f"rl-{arm}-s{s}")
        if r is None:
            continue
        b, a = r["result"]["start_test"]["columns"], r["result"]["test"]["columns"]
        if b["id"] != a["id"]:
            raise ValueError(f"rl-{arm}-s{s}: the test before and after RL are not the same problems in the same order")
        before.append(b["greedy_correct"])
        after.append(a["greedy_correct"])
    if len(after) < 2:
        return None
    d = stats.paired_differences(after, before)
    return {"seeds": len(after), "difference": stats.hierarchical_bootstrap(d, replicates=4000).as_dict(), "sign_flip_p": stats.sign_flip_p(d)}


SIGNALS = ("paper", "token_entropy", "self_bleu", "distinct_answers", "pass@k_minus_pass@1")


def signal_tracking(gated_rows: list[dict]) -> dict:
    """Spearman correlations over the gated grid points between each diversity signal (mean over problems) and the
    ground truth (mean per-problem strategy entropy): the paper's D, token entropy, self-BLEU (a diversity signal
    when it falls: expected negative), distinct final answers, pass@k - pass@1. None with fewer than 3 points."""
    if len(gated_rows) < 3:
        return {k: None for k in SIGNALS}
    truth = [float(np.mean(rules.strategy_score(r["columns"]))) for r in gated_rows]
    out = {"paper": stats.spearman([float(np.mean(rules.paper_score(r["columns"]))) for r in gated_rows], truth)}
    for key in SIGNALS[1:]:
        values = [r["summary"].get(key) for r in gated_rows]
        out[key] = None if None in values else stats.spearman(values, truth)
    return out


def m4(rl: dict, cfg: dict) -> dict:
    p = passes(rl, cfg["rl"]["pool_size"], cfg["rl"]["prompts_per_step"])
    target = rl["test"]["summary"].get("target_rate", 0.0)
    ok = p["gain"] >= M4_MIN_GAIN and p["gain"] > 2 * p["se"] and target >= 0.9
    return {**p, "test_target_rate_after": target, "pass": bool(ok)}


def unit_costs(records: dict) -> dict:
    """Median seconds per unit kind over idle units, and how many of each were idle / busy."""
    out: dict = {}
    for r in records.values():
        k = out.setdefault(r["kind"], {"idle": [], "busy": 0})
        if r["machine"]["busy"]:
            k["busy"] += 1
        elif not r["result"].get("same_as") and not r["result"].get("reused"):
            k["idle"].append(r["machine"]["seconds"])
    return {k: {"median_seconds": median(v["idle"]) if v["idle"] else None, "idle_units": len(v["idle"]), "busy_units": v["busy"]}
            for k, v in out.items()}


def outcome(records: dict, arm: str, seeds: list[int], field: str = "greedy_correct") -> tuple[list[int], list[list[float]]]:
    """Seeds with a finished unit of `arm`, and their test outcomes (seeds x problems)."""
    got = [(s, records[f"rl-{arm}-s{s}"]["result"]["test"]["columns"]) for s in seeds if f"rl-{arm}-s{s}" in records]
    return [s for s, _ in got], [c[field] for _, c in got]


def compare(records: dict, a: str, b: str, seeds: list[int], sesoi: float = SESOI_ACCURACY) -> dict:
    sa, xa = outcome(records, a, seeds)
    sb, xb = outcome(records, b, seeds)
    common = [s for s in sa if s in sb]
    if len(common) < 2:
        return {"seeds": len(common), "verdict": "not run"}
    xa = [xa[sa.index(s)] for s in common]
    xb = [xb[sb.index(s)] for s in common]
    d = stats.paired_differences(xa, xb)
    interval = stats.hierarchical_bootstrap(d, replicates=4000)
    p = stats.sign_flip_p(d)
    discordance = float(np.mean(d != 0))
    sd = stats.seed_sd(d)
    mde = stats.minimum_detectable_effect(len(common), d.shape[1], discordance, 0.0 if math.isnan(sd) else sd)
    mcnemar = stats.fisher_combined_mcnemar(np.asarray(xa, dtype=int), np.asarray(xb, dtype=int))  # per-seed exact tests, combined
    return {"seeds": len(common), "problems": int(d.shape[1]), "mean_a": float(np.mean(xa)), "mean_b": float(np.mean(xb)),
            "difference": interval.as_dict(), "sign_flip_p": p, "mcnemar_fisher_p": mcnemar["p"], "seed_signs": stats.seed_signs(d),
            "seed_sd": sd, "mde": mde,
            "verdict": stats.verdict(interval, p, sesoi)}


def c1(records: dict, coldstart: str, seeds: list[int]) -> dict:
    """Per seed of CE on `coldstart`: the paper's turning point, the ground truth's, and the strategy entropy
    (per problem, bits) at the paper's peak vs at the end; across seeds the paired decline with its interval."""
    per_seed, peak_rows, end_rows = [], [], []
    for s in seeds:
        key = f"sft-{coldstart}-ce-s{s}"
        if key not in records:
            continue
        grid = records[key]["result"]["grid"]
        paper, truth = rules.turning_point(grid, "paper"), rules.turning_point(grid, "strategy")
        gated = rules.gated(grid)
        signals = signal_tracking(gated)
        tracking = signals["paper"]
        peak = rules.row_at(grid, paper["peak_step"]) if paper["peak_step"] is not None else None
        if peak is not None:
            peak_rows.append(rules.strategy_score(peak["columns"]))
            end_rows.append(rules.strategy_score(grid[-1]["columns"]))
        per_seed.append({"seed": s, "paper": paper, "truth": truth, "spearman_paper_vs_truth": tracking, "spearman_vs_truth": signals,
                         "curve": [{"step": r["step"], "target_rate": r["summary"].get("target_rate"), "greedy_accuracy": r["summary"].get("greedy_accuracy"),
                                    "strategy_entropy": r["summary"].get("strategy_entropy"), "token_entropy": r["summary"].get("token_entropy"),
                                    "self_bleu": r["summary"].get("self_bleu"), "distinct_answers": r["summary"].get("distinct_answers"),
                                    "pass@k_minus_pass@1": r["summary"].get("pass@k_minus_pass@1"), "shares": r["summary"].get("strategy_shares")}
                                   for r in grid]})
    out: dict = {"seeds": per_seed, "detected": sum(x["paper"]["detected"] for x in per_seed),
                 "truth_detected": sum(x["truth"]["detected"] for x in per_seed),
                 "same_peak": sum(x["paper"]["peak_step"] is not None and x["paper"]["peak_step"] == x["truth"]["peak_step"] for x in per_seed)}
    tracked = {}
    for key in SIGNALS:
        rho = [x["spearman_vs_truth"][key] for x in per_seed if x["spearman_vs_truth"][key] is not None and not math.isnan(x["spearman_vs_truth"][key])]
        tracked[key] = {"seeds": len(rho), "median": median(rho) if rho else None, "positive": sum(r > 0 for r in rho)}
    out["tracking"] = tracked
    if len(peak_rows) >= 2:
        d = stats.paired_differences(peak_rows, end_rows)
        interval = stats.hierarchical_bootstrap(d, replicates=4000)
        p = stats.sign_flip_p(d)
        out["decline"] = {"difference": interval.as_dict(), "sign_flip_p": p, "verdict": stats.verdict(interval, p, SESOI_BITS)}
    return out
