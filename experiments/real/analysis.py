"""The real study's numbers from unit records alone: the RL pilot and its remedies, C1, C2 / C3 (pure functions).

Thresholds come from the config (`pilot`, `c1`, `verdicts`: plan amendment 1); changing one after the runs began is a
change of plan and is reported as one.
"""

from __future__ import annotations

import math
from statistics import median

import numpy as np

from aesl_lightning.study import stats
from real import rules

# ------------------------------------------------------------------------------------------ RL pilot


def passes(per_step: list[list[dict]], weights: tuple[float, float]) -> list[dict[str, dict]]:
    """Per pass over the pool, each prompt's numbers: the n-th time a prompt is seen is pass n. A prompt's `reward`
    is the mean over its G completions of w_acc * correct + w_box * boxed (the training reward); `boxed`, `entropy_sum`
    and `tokens` are summed over the group."""
    seen: dict[str, int] = {}
    out: list[dict[str, dict]] = []
    for batch in per_step:
        for x in batch:
            p = seen.get(x["id"], 0)
            seen[x["id"]] = p + 1
            while len(out) <= p:
                out.append({})
            g = len(x["correct"])
            out[p][x["id"]] = {"reward": sum(weights[0] * c + weights[1] * b for c, b in zip(x["correct"], x["boxed"])) / g,
                               "accuracy": sum(x["correct"]) / g, "boxed": sum(x["boxed"]), "completions": g,
                               "entropy_sum": x["entropy_sum"], "tokens": x["tokens"]}
    return out


def pass_gain(result: dict, weights: tuple[float, float]) -> dict:
    """Last pass minus first pass of the pool reward, paired by prompt (for 2 passes: pass 2 - pass 1), with its SE
    over prompts; the sample boxed rate and the mean token entropy of the completions of each of the two passes."""
    by_pass = passes(result["per_step"], weights)
    if len(by_pass) < 2:
        return {"prompts": 0, "passes": len(by_pass), "gain": float("nan"), "se": float("nan")}
    first, last = by_pass[0], by_pass[-1]
    keys = [k for k in first if k in last]
    d = [last[k]["reward"] - first[k]["reward"] for k in keys]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")

    def pooled(p: dict, key: str, per: str) -> float:
        total = sum(p[k][per] for k in keys)
        return sum(p[k][key] for k in keys) / total if total else float("nan")

    return {"prompts": n, "passes": len(by_pass), "first": sum(first[k]["reward"] for k in keys) / n if n else None,
            "last": sum(last[k]["reward"] for k in keys) / n if n else None, "gain": mean, "se": se,
            "accuracy_first": sum(first[k]["accuracy"] for k in keys) / n if n else None,
            "accuracy_last": sum(last[k]["accuracy"] for k in keys) / n if n else None,
            "boxed_rate_last": pooled(last, "boxed", "completions"),
            "entropy_first": pooled(first, "entropy_sum", "tokens"), "entropy_last": pooled(last, "entropy_sum", "tokens")}


def pilot_check(result: dict, p: dict, weights: tuple[float, float]) -> dict:
    """The pilot's pass rule: gain >= `min_gain` and > `se_k` SE, sample boxed rate of the last pass >= `min_boxed`,
    mean token entropy of the last pass >= `min_entropy_ratio` x the first pass's. (`se_k` None: no SE condition;
    smoke runs only.)"""
    g = pass_gain(result, weights)
    checks = {"gain": g["gain"] >= p["min_gain"],
              "gain_over_se": True if p["se_k"] is None else g["gain"] > p["se_k"] * g["se"],
              "boxed": g.get("boxed_rate_last", float("nan")) >= p["min_boxed"],
              "entropy": g.get("entropy_last", float("nan")) >= p["min_entropy_ratio"] * g.get("entropy_first", float("nan"))}
    checks = {k: bool(v) for k, v in checks.items()}  # NaN comparisons are False: a check that cannot be made fails
    return {**g, "checks": checks, "pass": all(checks.values())}


def remedy_ids(cfg: dict) -> tuple[str, str]:
    r = cfg["rl"]
    return f"pilot-rl-lr{r['remedy_lr']:.0e}".replace("e-0", "e-"), f"pilot-rl-{r['remedy_passes']}pass"


def pilot_decision(records: dict, cfg: dict) -> dict:
    """What the recorded pilot units decide: `status` pending / passed / failed, the RL `settings` of the passing
    unit (overrides of `rl`), the remedy units to schedule (`units`: id -> settings) and each recorded check.

    Order (plan amendment 1): `pilot-rl` (the config's `rl`); if it fails, the learning-rate remedy; if that fails
    too, more passes over the pool at the learning rate of the better of the two (higher gain; ties: the first)."""
    weights = tuple(cfg["rl"]["reward_weights"])
    lr_id, passes_id = remedy_ids(cfg)
    steps = [("pilot-rl", {})]
    units = {"pilot-rl": {}}
    checks = {}
    for unit_id, settings in steps + [(lr_id, {"lr": cfg["rl"]["remedy_lr"]})]:
        units[unit_id] = settings
        if unit_id not in records:
            return {"status": "pending", "settings": None, "units": units, "checks": checks, "passing": None}
        checks[unit_id] = pilot_check(records[unit_id]["result"], cfg["pilot"], weights)
        if checks[unit_id]["pass"]:
            return {"status": "passed", "settings": settings, "units": units, "checks": checks, "passing": unit_id}
    better = lr_id if checks[lr_id]["gain"] > checks["pilot-rl"]["gain"] else "pilot-rl"
    settings = {"lr": cfg["rl"]["remedy_lr"] if better == lr_id else cfg["rl"]["lr"], "passes": cfg["rl"]["remedy_passes"]}
    units[passes_id] = settings
    if passes_id not in records:
        return {"status": "pending", "settings": None, "units": units, "checks": checks, "passing": None}
    checks[passes_id] = pilot_check(records[passes_id]["result"], cfg["pilot"], weights)
    if checks[passes_id]["pass"]:
        return {"status": "passed", "settings": settings, "units": units, "checks": checks, "passing": passes_id}
    return {"status": "failed", "settings": None, "units": units, "checks": checks, "passing": None}


# ------------------------------------------------------------------------------------------ C1


def c1_verdict(interval: stats.Interval, p_one_sided: float, detected: int, seeds: int, c: dict) -> str:
    """Supported: interval above 0, one-sided sign-flip p <= `alpha` and a turning point in at least `min_detected_share`
    of the seeds (4 of 5); refuted: the interval's upper end below `sesoi` (no decline of that size); else
    inconclusive."""
    if interval.low > 0 and p_one_sided <= c["alpha"] and detected >= math.ceil(c["min_detected_share"] * seeds - 1e-9):
        return "supported"
    if interval.high < c["sesoi"]:
        return "refuted"
    return "inconclusive"


def c1(records: dict, cfg: dict) -> dict:
    """Per CE seed: format step, the paper's peak, confirmed or not, best-accuracy step and the curves; across seeds the
    decline of distinct final answers (peak minus end, paired by seed and problem) and the verdict."""
    c = cfg["c1"]
    seeds = [s for s in c["seeds"] + c["extra_seeds"] if f"sft-ce-s{s}" in records]
    per_seed, peak_rows, end_rows = [], [], []
    for s in seeds:
        grid = records[f"sft-ce-s{s}"]["result"]["grid"]
        tp = rules.turning_point(grid, c["format_level"], c["noise_k"], c["se_replicates"])
        entry = {"seed": s, **{k: v for k, v in tp.items() if k != "curve"}, "best_accuracy_step": rules.best_accuracy(grid)["step"],
                 "curve": [{"step": r["step"], **r["summary"], "score": t["score"], "score_se": t["se"]} for r, t in zip(grid, tp["curve"])]}
        if tp["peak_step"] is not None:
            peak, end = rules.row_at(grid, tp["peak_step"])["columns"], grid[-1]["columns"]
            stats.align([{"id": i} for i in peak["id"]], [{"id": i} for i in end["id"]], key="id")
            peak_rows.append(peak[c["measure"]])
            end_rows.append(end[c["measure"]])
            entry["decline"] = float(np.mean(peak[c["measure"]]) - np.mean(end[c["measure"]]))
        per_seed.append(entry)
    detected = sum(x["detected"] for x in per_seed)
    exploratory = {name: decline_from_best_accuracy(records, seeds, fn, cfg) for name, fn in EXPLORATORY_C1.items()}
    out: dict = {"exploratory": exploratory, "seeds": per_seed, "recorded": len(seeds), "planned": len(c["seeds"]), "detected": detected,
                 "format_not_learned": sum(x["peak_step"] is None for x in per_seed), "measure": c["measure"]}
    if peak_rows:
        d = stats.paired_differences(peak_rows, end_rows)
        interval = stats.hierarchical_bootstrap(d, replicates=cfg["verdicts"]["replicates"])
        p = stats.sign_flip_p(d, alternative="greater")
        sd = stats.seed_sd(d)
        variance = float(np.mean(d.var(axis=1, ddof=1))) if d.shape[1] > 1 else 0.0
        out.update(decline=interval.as_dict(), sign_flip_p_one_sided=p, seed_means=stats.seed_means(d).tolist(),
                   mde=stats.detectable_effect(len(peak_rows), d.shape[1], variance, 0.0 if math.isnan(sd) else sd),
                   verdict=c1_verdict(interval, p, detected, len(seeds), c))
    else:
        out["verdict"] = "inconclusive" if seeds else "not run"
    return out


def pass_gap_per_problem(columns: dict, k: int) -> list[float]:
    """pass@k - pass@1 of each problem from its count of right samples c among k: 1[c > 0] - c / k."""
    return [float(c > 0) - c / k for c in columns["correct"]]


# plan amendment 4: exploratory declines from the best-accuracy step to the end (not verdict-bearing)
EXPLORATORY_C1 = {"distinct_answers": lambda columns, k: [float(x) for x in columns["distinct_answers"]],
                  "pass_gap": pass_gap_per_problem}


def decline_from_best_accuracy(records: dict, seeds: list[int], per_problem, cfg: dict) -> dict:
    """A measure at each seed's best-accuracy step minus at the last grid point, paired by seed and problem: the
    95 % hierarchical-bootstrap interval, the one-sided sign-flip p over seeds ("it declines") and each seed's decline."""
    k = cfg["eval"]["samples"]
    at_best, at_end, steps = [], [], []
    for s in seeds:
        grid = records[f"sft-ce-s{s}"]["result"]["grid"]
        best, end = rules.best_accuracy(grid), grid[-1]
        stats.align([{"id": i} for i in best["columns"]["id"]], [{"id": i} for i in end["columns"]["id"]], key="id")
        at_best.append(per_problem(best["columns"], k))
        at_end.append(per_problem(end["columns"], k))
        steps.append(best["step"])
    if not seeds:
        return {"seeds": 0}
    d = stats.paired_differences(at_best, at_end)
    return {"seeds": len(seeds), "best_accuracy_steps": steps, "end_step": cfg["sft"]["max_steps"],
            "at_best": float(np.mean(at_best)), "at_end": float(np.mean(at_end)),
            "decline": stats.hierarchical_bootstrap(d, replicates=cfg["verdicts"]["replicates"]).as_dict(),
            "sign_flip_p_one_sided": stats.sign_flip_p(d, alternative="greater"), "seed_declines": stats.seed_means(d).tolist()}


# ------------------------------------------------------------------------------------------ RL's effect on test


def test_change(result: dict) -> dict:
    """Test greedy accuracy after RL minus before, paired by problem (plan amendment 4): the problems lost (right before,
    wrong after) and gained, and the exact McNemar p. Not verdict-bearing: C2 / C3 compare arms after identical RL."""
    before, after = result["start_test"]["columns"], result["test"]["columns"]
    stats.align([{"id": i} for i in before["id"]], [{"id": i} for i in after["id"]], key="id")
    lost, gained = stats.discordant_pairs(before["greedy_correct"], after["greedy_correct"])
    n = len(before["id"])
    return {"problems": n, "before": sum(before["greedy_correct"]) / n, "after": sum(after["greedy_correct"]) / n,
            "change": (gained - lost) / n, "lost": lost, "gained": gained, "mcnemar_p": stats.mcnemar_exact(lost, gained)}


# ------------------------------------------------------------------------------------------ C2 / C3


def comparison_verdict(interval: stats.Interval, p: float, seed_means: list[float], v: dict) -> str:
    """Supported: interval above 0, Fisher-combined McNemar p < `alpha` and every seed's mean > 0; opposite: interval
    below 0 with p < `alpha`; refuted: the interval's upper end below `sesoi` ("no gain of 3 points or more");
    else inconclusive. (Opposite is tested before refuted: an interval below 0 is also below the SESOI.)"""
    if interval.low > 0 and p < v["alpha"] and all(m > 0 for m in seed_means):
        return "supported"
    if interval.high < 0 and p < v["alpha"]:
        return "opposite"
    if interval.high < v["sesoi"]:
        return "refuted"
    return "inconclusive"


def outcomes(records: dict, arm: str, seeds: list[int]) -> dict[int, dict]:
    """Test columns after RL of each seed with a recorded unit of `arm`."""
    return {s: records[f"rl-{arm}-s{s}"]["result"]["test"]["columns"] for s in seeds if f"rl-{arm}-s{s}" in records}


def manipulation(records: dict, arm: str, seeds: list[int], cfg: dict) -> dict:
    """Each RL unit of `arm`: last pass minus first pass of the pool reward > `se_k` SE (paired by prompt)."""
    weights, k = tuple(cfg["rl"]["reward_weights"]), cfg["pilot"]["se_k"] or 0.0
    runs = {}
    for s in seeds:
        if f"rl-{arm}-s{s}" in records:
            g = pass_gain(records[f"rl-{arm}-s{s}"]["result"], weights)
            runs[s] = {**g, "pass": bool(g["gain"] > k * g["se"]) if not math.isnan(g["gain"]) else False}
    return {"runs": runs, "passed": sum(r["pass"] for r in runs.values()), "units": len(runs),
            "most": 2 * sum(r["pass"] for r in runs.values()) > len(runs)}


def compare(records: dict, a: str, b: str, seeds: list[int], cfg: dict) -> dict:
    """A - B on test greedy accuracy after RL, paired by seed and problem: interval, Fisher-combined McNemar, seeds'
    means, MDE from the measured seed SD and discordance, the manipulation check of both arms, and the verdict."""
    xa, xb = outcomes(records, a, seeds), outcomes(records, b, seeds)
    common = [s for s in seeds if s in xa and s in xb]
    if not common:
        return {"seeds": [], "verdict": "not run"}
    for s in common:
        stats.align([{"id": i} for i in xa[s]["id"]], [{"id": i} for i in xb[s]["id"]], key="id")
    ma = [xa[s]["greedy_correct"] for s in common]
    mb = [xb[s]["greedy_correct"] for s in common]
    d = stats.paired_differences(ma, mb)
    interval = stats.hierarchical_bootstrap(d, replicates=cfg["verdicts"]["replicates"])
    mcnemar = stats.fisher_combined_mcnemar(ma, mb)
    means = stats.seed_means(d).tolist()
    sd = stats.seed_sd(d)
    discordance = float(np.mean(d != 0))
    manip = {arm: manipulation(records, arm, common, cfg) for arm in (a, b)}
    same = [s for s in common if records[f"rl-{a}-s{s}"]["result"].get("start") == records[f"rl-{b}-s{s}"]["result"].get("start")]
    out = {"seeds": common, "planned": len(seeds), "problems": int(d.shape[1]), "mean_a": float(np.mean(ma)), "mean_b": float(np.mean(mb)),
           "difference": interval.as_dict(), "fisher_mcnemar_p": mcnemar["p"], "per_seed_mcnemar": mcnemar["per_seed"], "seed_means": means,
           "seed_sd": sd, "discordance": discordance, "same_start_seeds": same,
           "mde": stats.minimum_detectable_effect(len(common), d.shape[1], discordance, 0.0 if math.isnan(sd) else sd),
           "manipulation": {arm: {k: v for k, v in m.items() if k != "runs"} for arm, m in manip.items()}}
    if not all(m["most"] for m in manip.values()):
        out["verdict"] = "not read (the manipulation check failed in most RL units of an arm)"
    else:
        out["verdict"] = comparison_verdict(interval, mcnemar["p"], means, cfg["verdicts"])
    return out


def unit_costs(records: dict) -> dict:
    """Median seconds per unit kind over idle units that did the work themselves, and how many were idle / busy."""
    out: dict = {}
    for r in records.values():
        k = out.setdefault(r["kind"], {"idle": [], "busy": 0})
        if r["machine"]["busy"]:
            k["busy"] += 1
        elif not r["result"].get("same_as"):
            k["idle"].append(r["machine"]["seconds"])
    return {k: {"median_seconds": median(v["idle"]) if v["idle"] else None, "idle_units": len(v["idle"]), "busy_units": v["busy"]}
            for k, v in out.items()}
