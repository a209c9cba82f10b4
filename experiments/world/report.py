"""preflight.md / results.md, results.json and the figures of the strategy world, rebuilt from the unit files alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median

from aesl_lightning.study.report import markdown_table
from aesl_lightning.study.units import UnitStore, strict_json
from world import analysis as A


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _interval(c: dict) -> str:
    d = c["difference"]
    return f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _version(unit_id: str) -> str:
    """`v2` from a superseded record's id `tune-sft-lr1e-4-v2`."""
    return unit_id.rsplit("-", 1)[-1]


def _main(cfg: dict, records: dict) -> dict:
    """Comparisons, arms and C1 from main-unit records keyed by their current ids."""
    out: dict = {}
    seeds = cfg["main"]["seeds"]
    if any(k.startswith("rl-") for k in records):
        from world.study import ARMS

        arms = {}
        for arm in cfg["main"]["arms"]:
            got = [records[f"rl-{arm}-s{s}"]["result"] for s in seeds if f"rl-{arm}-s{s}" in records]
            if got:
                manipulation = [A.passes(g, cfg["rl"]["pool_size"], cfg["rl"]["prompts_per_step"]) for g in got]
                arms[arm] = {"seeds": len(got),
                             "test_accuracy": [g["test"]["summary"]["greedy_accuracy"] for g in got],
                             "start_accuracy": [g["start_test"]["summary"]["greedy_accuracy"] for g in got],
                             "shares_after": [g["test"]["summary"].get("strategy_shares") for g in got],
                             "shares_before": [g["start_test"]["summary"].get("strategy_shares") for g in got],
                             "manipulation": manipulation, "moved": [A.moved(m) for m in manipulation],
                             "rl_gain": A.rl_gain(records, arm, seeds)}
        out["arms"] = arms
        out["comparisons"] = {name: A.compare(records, a, b, seeds) for name, (a, b) in A.COMPARISONS.items()}
        control_seeds = cfg["main"].get("control_seeds", {})
        for name, (a, b) in A.COMPARISONS.items():
            c = out["comparisons"][name]
            c["planned_seeds"] = len(control_seeds.get(ARMS[a][0], seeds))  # a verdict is read only at the plan's seed count
            # the plan's manipulation check: a comparison is read only if RL moved in most units of both arms
            c["rl_moved"] = {arm: [sum(arms[arm]["moved"]), arms[arm]["seeds"]] if arm in arms else None for arm in (a, b)}
            c["read"] = all(m is not None and 2 * m[0] > m[1] for m in c["rl_moved"].values())
    for coldstart in ("narrow", "best", "all"):
        if any(k.startswith(f"sft-{coldstart}-ce-") for k in records):
            out[f"C1_{coldstart}"] = A.c1(records, coldstart, seeds)
            out[f"C1_{coldstart}"]["planned_seeds"] = len(cfg["main"].get("control_seeds", {}).get(coldstart, seeds))
    return out


def meta(records: dict) -> dict:
    """Where and when the current main units ran: commits, span, summed unit time, load at the units' starts."""
    main = [r for k, r in records.items() if not r.get("superseded") and (k.startswith("sft-") or k.startswith("rl-"))]
    if not main:
        return {}
    starts = sorted(r["machine"]["start"]["time"] for r in main)
    ends = sorted(r["machine"]["end"]["time"] for r in main)
    load = [r["machine"]["start"]["loadavg"][0] for r in main]
    cpus = sorted({f"{c.get('model', '?')} ({c.get('cores', '?')} cores)" for c in (r["machine"]["start"].get("cpu", {}) for r in main)})
    return {"command": "python experiments/strategy_world.py --run [--until HH:MM]", "units": len(main),
            "commits": sorted({r["machine"]["start"]["commit"] for r in main}), "first_start": starts[0], "last_end": ends[-1],
            "unit_hours": sum(r["machine"]["seconds"] for r in main) / 3600, "busy_units": sum(bool(r["machine"]["busy"]) for r in main),
            "start_load_median": median(load), "start_load_max": max(load), "cpus": cpus}


def summarise(cfg: dict, records: dict) -> dict:
    out: dict = {"costs": A.unit_costs(records), "units": {k: {"kind": r["kind"], "busy": r["machine"]["busy"], "seconds": r["machine"]["seconds"],
                                                                 "start": r["machine"]["start"], "end": r["machine"]["end"]} for k, r in records.items()}}
    if "base-check" in records:
        out.update(A.m1_m2(records["base-check"]["result"]))
    if "base" in records and "snapshot_checks" in records["base"]["result"]:
        r = records["base"]["result"]
        out["base_selection"] = {"chosen_step": r["chosen_step"], "snapshots": [{"step": c["step"], **A.m1_m2({"summary": c["summary"]})}
                                                                               for c in r["snapshot_checks"]]}
    if "sft-narrow-ce-s0" in records:
        out["M3"] = A.m3(records["sft-narrow-ce-s0"]["result"])
    out["tuning"] = {k: {"overrides": r["params"].get("overrides"), "superseded": _version(k) if r.get("superseded") else None, **A.m3(r["result"])}
                     for k, r in records.items() if r["kind"] == "tune"}
    out["superseded_bases"] = {_version(k): A.m1_m2(r["result"]) for k, r in sorted(records.items()) if k.startswith("base-check-") and r.get("superseded")}
    pilots = {k: A.m4(r["result"], cfg) for k, r in records.items() if k.startswith("pilot-rl-") and "test" in r["result"] and not r.get("superseded")}
    if pilots:
        out["M4"] = {"runs": pilots, "pass": sum(p["pass"] for p in pilots.values()) * 2 > len(pilots)}
    out["meta"] = meta(records)
    out.update(_main(cfg, {k: r for k, r in records.items() if not r.get("superseded")}))  # the main results: current records only
    out["superseded_main"] = {}  # a set of main runs set aside whole (amendment 10's `avx2`): reported apart, never pooled
    for version in sorted({_version(k) for k, r in records.items() if r.get("superseded") and k.startswith("rl-")}):
        sub = {k[: -len(version) - 1]: r for k, r in records.items() if r.get("superseded") and k.endswith(f"-{version}")
               and (k.startswith("sft-") or (k.startswith("rl-") and "test" in r["result"]))}
        main = _main(cfg, sub)
        if main.get("arms"):
            out["superseded_main"][version] = main
    return out


def _preflight_lines(s: dict) -> list[str]:
    lines = ["## Pre-flight checks", ""]
    if "M1" in s:
        m = s["M1"]
        shares = ", ".join(f"{k} {_f(v)}" for k, v in m["shares"].items())
        success = ", ".join(f"{k} {_f(v)}" for k, v in m["success"].items())
        lines += [f"- **M1** ({A.check(m['pass'])}): base strategy shares among k samples: {shares} (each >= {A.M1_MIN_SHARE}); "
                  f"success (right value, any format): {success}; spread {_f(m['spread'])} (>= {A.M1_MIN_SPREAD}); best minus round "
                  f"{_f(m['best_minus_round'])} (>= {A.M1_ROUND_BELOW_BEST})."]
    if "M2" in s:
        lines += [f"- **M2** ({A.check(s['M2']['pass'])}): base target-format rate {_f(s['M2']['target_rate'])} (<= {A.M2_MAX_TARGET})."]
    if "base_selection" in s:
        b = s["base_selection"]
        chosen = f"step {b['chosen_step']}" if b["chosen_step"] is not None else "none qualified (the last snapshot is used; see plan.md)"
        lines += ["", f"Base selection (amendment 5: the first snapshot where M1 and M2 pass and round's success >= "
                      f"{A.BASE_MIN_ROUND_SUCCESS}): {chosen}.", ""]
        lines += markdown_table(["step", "shares direct / round / column", "success direct / round / column", "M1", "M2"],
                                [[c["step"], " / ".join(_f(c["M1"]["shares"].get(k)) for k in ("direct", "round", "column")),
                                  " / ".join(_f(c["M1"]["success"].get(k)) for k in ("direct", "round", "column")),
                                  A.check(c["M1"]["pass"]), A.check(c["M2"]["pass"])] for c in b["snapshots"]])
    if "M3" in s:
        m = s["M3"]
        lines += [f"- **M3** ({A.check(m['pass'])}): CE (narrow, seed 0) learns the format (target rate >= 0.8) at step {m['format_step']} "
                  f"(<= {A.M3_FORMAT_BY_STEP}); at the end the other strategies hold {_f(m['end_not_coldstart_share'])} of samples "
                  f"(<= {A.M3_MAX_OTHER_AT_END}); end shares: " + ", ".join(f"{k} {_f(v)}" for k, v in m["end_shares"].items()) + ".",
                  f"- **M3b** ({A.check(m['M3b'])}): k-sample accuracy (target format, right value) at the first gated grid point "
                  f"{_f(m['pass1_at_format_step'])} (in [{A.M3B_PASS1[0]}, {A.M3B_PASS1[1]}]); at the end {_f(m['end_pass1'])}."]
    if "M4" in s:
        lines += [f"- **M4** ({A.check(s['M4']['pass'])}): RL raises its training reward, pass 2 minus pass 1 over the fixed pool, paired by prompt:"]
        for k, m in s["M4"]["runs"].items():
            lines += [f"  - {k}: {_f(m['pass1'])} -> {_f(m['pass2'])}, gain {_f(m['gain'])} (SE {_f(m['se'])}; >= {A.M4_MIN_GAIN} and > 2 SE), "
                      f"test target rate after RL {_f(m['test_target_rate_after'])} (>= 0.9): {A.check(m['pass'])}"]
    if s.get("tuning"):
        rows = []
        for k, t in sorted(s["tuning"].items()):
            st = t["success_start_end"]
            label = f" ({t['superseded']}, superseded)" if t["superseded"] else ""
            rows.append([f"{k}{label}", json.dumps(t["overrides"].get("sft") if t["overrides"] else None), t["format_step"],
                         _f(t["end_target_rate"]), f"{_f(st[0])} -> {_f(st[1])}", _f(t["end_not_coldstart_share"]),
                         f"{_f(t['pass1_at_format_step'])} -> {_f(t['end_pass1'])}", A.check(t["pass"]), A.check(t["M3b"])])
        lines += ["", "## SFT tuning runs (narrow cold start, CE, seed 0; 16 validation problems x 4 samples)", ""]
        lines += markdown_table(["run", "settings", "format step", "target rate at end", "round success step 0 -> end",
                                 "other strategies at end", "pass@1 at format step -> end", "M3", "M3b"], rows)
    for version, v in s.get("superseded_bases", {}).items():
        lines += ["", f"World {version} base (superseded, see plan.md): M1 {A.check(v['M1']['pass'])} (shares "
                  + ", ".join(f"{k} {_f(x)}" for k, x in v["M1"]["shares"].items()) + "; success "
                  + ", ".join(f"{k} {_f(x)}" for k, x in v["M1"]["success"].items()) + f"), M2 {A.check(v['M2']['pass'])} (target rate {_f(v['M2']['target_rate'])})."]
    lines += ["", "## Unit costs (idle units only)", ""]
    lines += markdown_table(["kind", "median minutes", "idle units", "busy units"],
                            [[k, _f(c["median_seconds"] / 60 if c["median_seconds"] else None, 1), c["idle_units"], c["busy_units"]]
                             for k, c in sorted(s["costs"].items())])
    return lines


CONTROL_BEST = "control (best strategy): turning point vs best accuracy"


def _reading(name: str, c: dict) -> str:
    """A comparison's verdict as the plan reads it: only at the planned seed count, only if RL moved in most units of
    both arms (the manipulation check), and for the `best` control as a prediction of no effect."""
    if c["verdict"] == "not run":
        return "not run"
    if name == CONTROL_BEST:
        d = c["difference"]
        inside = -A.SESOI_ACCURACY <= d["low"] and d["high"] <= A.SESOI_ACCURACY
        reading = ("as predicted (no C2 effect: interval inside +-0.03)" if inside else
                   f"not as predicted (the interval is not inside +-{A.SESOI_ACCURACY})")
    else:
        reading = c["verdict"]
    if not c.get("read", True):
        moved = ", ".join(f"{arm} {m[0]}/{m[1]}" for arm, m in c["rl_moved"].items() if m)
        reading = f"not read: RL did not move in most units of both arms ({moved}); would read {reading}"
    return reading if c["seeds"] >= c.get("planned_seeds", 0) else f"interim, no verdict (reads {reading} so far)"


def _c1_reading(c: dict, control: bool) -> str:
    d = c["decline"]
    if control:  # the `all` cold start predicts no collapse: the decline's interval below the smallest effect of interest
        reading = ("as predicted (no collapse: interval below 0.1 bits)" if d["difference"]["high"] < A.SESOI_BITS else
                   f"not as predicted (the decline's interval reaches {d['difference']['high']:+.3f} bits; reads {d['verdict']})")
    else:
        reading = d["verdict"]
    n = len(c["seeds"])
    return reading if n >= c.get("planned_seeds", 0) else f"interim at {n} of {c['planned_seeds']} seeds, no verdict (reads {reading} so far)"


def _shares(shares: list[dict | None]) -> str:
    got = [x for x in shares if x]
    if not got:
        return "-"
    return " / ".join(_f(sum(x.get(k, 0.0) for x in got) / len(got)) for k in ("direct", "round", "column", "other"))


def _verdict_lines(s: dict) -> list[str]:
    comps = s.get("comparisons", {})
    lines = ["", "## Verdicts (the plan's rules; each with the number it rests on)", ""]
    c = s.get("C1_narrow")
    if c and "decline" in c:
        t = c["tracking"]["paper"]
        lines.append(f"- **C1** (a narrow cold start collapses strategy diversity after the format is learned, and the paper's signals see it): "
                     f"{_c1_reading(c, False)}: strategy entropy at the paper-rule peak minus at the end {_interval(c['decline'])} bits per "
                     f"problem (p {_f(c['decline']['sign_flip_p'])}); the paper's rule detected a turning point in {c['detected']} of "
                     f"{len(c['seeds'])} seeds and its peak was the ground truth's in {c['same_peak']}; Spearman(D, strategy entropy) over the "
                     f"gated grid, median {_f(t['median'])} ({t['positive']} of {t['seeds']} seeds positive).")
    for name, label in (("C2: turning point vs best accuracy", "C2"), ("C2': turning point vs CE end", "C2'"),
                        ("C3: AESL vs CE best accuracy", "C3"), ("C3': AESL vs CE end", "C3'"), (CONTROL_BEST, "Control `best`")):
        x = comps.get(name)
        if x and x["verdict"] != "not run":
            lines.append(f"- **{label}** ({name}): {_reading(name, x)}: {_interval(x)} test accuracy after RL (sign-flip p over seeds "
                         f"{_f(x['sign_flip_p'])}, MDE {_f(x['mde'])}, {x['seeds']} seeds).")
    c = s.get("C1_all")
    if c and "decline" in c:
        lines.append(f"- **Control `all`** (a cold start covering every strategy predicts no collapse): {_c1_reading(c, True)}: decline "
                     f"{_interval(c['decline'])} bits (p {_f(c['decline']['sign_flip_p'])}).")
    arms = s.get("arms", {})
    if arms:
        moved = ", ".join(f"{arm} {sum(a['moved'])}/{a['seeds']}" for arm, a in arms.items())
        lines.append(f"- **Manipulation check** (training reward, pass 2 minus pass 1 paired by prompt, > 2 SE): units where RL moved: {moved}.")
    return lines


def _main_lines(s: dict, verdicts: bool = True) -> list[str]:
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines = _verdict_lines(s) if verdicts else []
    lines += ["", "## Accuracy after RL (test, greedy, target format) and the secondary endpoints", "",
              "RL gain: after minus before on the same test problems, paired by seed and problem (95 % hierarchical bootstrap). "
              "Training reward: pool reward in pass 1 and pass 2, paired by prompt (mean over seeds). "
              "Strategy shares among the k test samples, direct / round / column / other (mean over seeds).", ""]
    rows = []
    for arm, a in s.get("arms", {}).items():
        g = a.get("rl_gain")
        m = a.get("manipulation", [])
        rows.append([arm, a["seeds"], _f(mean(a["start_accuracy"])), _f(mean(a["test_accuracy"])), _interval(g) if g else "-",
                     f"{_f(mean([x['pass1'] for x in m]))} -> {_f(mean([x['pass2'] for x in m]))}" if m else "-",
                     f"{sum(a.get('moved', []))} of {a['seeds']}", _shares(a["shares_before"]), _shares(a["shares_after"])])
    lines += markdown_table(["arm", "seeds", "before RL", "after RL", "RL gain [95 % CI]", "training reward pass 1 -> 2", "RL moved",
                             "shares before RL", "shares after RL"], rows)
    lines += ["", "## Comparisons (paired by seed and problem; 95 % hierarchical bootstrap; sign-flip p over seeds)", "",
              "The verdicts use the interval and the sign-flip test over seeds (each seed's SFT and RL are one replicate). results.json also "
              "holds per-seed exact McNemar tests combined by Fisher's method (`mcnemar_fisher_p`): they ask whether the two checkpoints "
              "of some seed differ on these problems, in either direction, and are not a test of the claim.", ""]
    lines += markdown_table(["comparison", "seeds", "A - B [95 % CI]", "sign-flip p", "MDE", "verdict"],
                            [[name, c["seeds"], "-", "-", "-", "not run"] if c["verdict"] == "not run" else
                             [name, f"{c['seeds']} of {c['planned_seeds']}", _interval(c), _f(c["sign_flip_p"]),
                              _f(c["mde"]), _reading(name, c)]
                             for name, c in s.get("comparisons", {}).items()])
    for coldstart in ("narrow", "best", "all"):
        c = s.get(f"C1_{coldstart}")
        if not c:
            continue
        lines += ["", f"## Diversity during CE SFT ({coldstart} cold start)", "",
                  f"Paper's rule detected a turning point in {c['detected']} of {len(c['seeds'])} seeds; the ground truth's rule in "
                  f"{c['truth_detected']}; the two peaks coincide in {c.get('same_peak', '-')}.", ""]
        if "decline" in c:
            lines.append(f"Strategy entropy, paper's peak minus end (bits per problem): {_interval(c['decline'])}, p {_f(c['decline']['sign_flip_p'])}: "
                         + _c1_reading(c, coldstart == "all") + f" (smallest effect of interest {A.SESOI_BITS} bits).")
        if c.get("tracking"):
            lines += ["", "Does each signal track the ground truth? Spearman correlation with the mean strategy entropy over the gated "
                          "grid points, per seed (self-BLEU should correlate negatively):", ""]
            lines += markdown_table(["signal", "seeds", "median Spearman", "seeds positive"],
                                    [[k, t["seeds"], _f(t["median"]), t["positive"]] for k, t in c["tracking"].items()])
        lines += [""]
        lines += markdown_table(["seed", "format step", "paper peak", "detected", "truth peak", "Spearman(paper, truth)"],
                                [[x["seed"], x["paper"]["format_step"], x["paper"]["peak_step"], x["paper"]["detected"],
                                  x["truth"]["peak_step"], _f(x["spearman_paper_vs_truth"])] for x in c["seeds"]])
    return lines


def write(cfg: dict, store: UnitStore, out: Path) -> Path:
    records = store.records()
    s = summarise(cfg, records)
    (out / "results.json").write_text(json.dumps(strict_json(s), indent=1, sort_keys=True, allow_nan=False) + "\n")
    main = any(k.startswith("rl-") and not r.get("superseded") for k, r in records.items())
    title = "results.md" if main else "preflight.md"
    lines = [f"# Strategy world: {'results' if main else 'pre-flight'}", "",
             "A mechanism test in a controlled world (a from-scratch ~1M-parameter model), not evidence about 7B models. "
             "Rebuilt by `python experiments/strategy_world.py --report` from `units/*.json` alone; the plan is plan.md.", ""]
    if s.get("meta"):
        m = s["meta"]
        lines += [f"Main units: {m['units']} ({m['unit_hours']:.1f} unit-hours), {m['first_start']} to {m['last_end']}, by `{m['command']}` on "
                  f"{', '.join(m['cpus'])}; {m['busy_units']} units busy (other processes' CPU time while a unit ran); 1-minute load average at unit "
                  f"starts median {m['start_load_median']:.2f}, max {m['start_load_max']:.2f} (units run back to back, so this is mostly the "
                  f"previous unit); commits {', '.join(m['commits'])}. Each unit's record "
                  "(units/<id>.json) holds its commit, load and times at start and end.", ""]
    lines += _preflight_lines(s) + (_main_lines(s) if main or any(k.startswith("C1_") for k in s) else [])
    for version, sub in s.get("superseded_main", {}).items():
        lines += ["", f"## Superseded main runs `{version}` (set aside whole, see plan.md; not pooled with the results above)"]
        lines += [("#" + line) if line.startswith("## ") else line for line in _main_lines(sub, verdicts=False)]
    path = out / title
    path.write_text("\n".join(lines) + "\n")
    try:
        from world.figures import write_figures

        write_figures(s, out)
    except ImportError:
        pass
    return path
