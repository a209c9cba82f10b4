"""results.md / results.json / figures of the real study, rebuilt from the unit files alone (`<out>/units/*.json`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from aesl_lightning.study.units import UnitStore, strict_json
from real import analysis as A

CURVE = (("greedy_accuracy", "val acc"), ("sample_boxed_rate", "boxed"), ("distinct_answers", "distinct answers"),
         ("pass@k_minus_pass@1", "pass@k - pass@1"), ("distinct_paths", "distinct paths"), ("entropy", "entropy"),
         ("self_bleu", "self-BLEU"), ("score", "D"), ("sample_tokens", "tokens"))


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _interval(d: dict) -> str:
    return f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarise(cfg: dict, records: dict) -> dict:
    """Every number of the report (pure: records in, numbers out)."""
    out: dict = {"costs": A.unit_costs(records), "estimates": cfg["estimates"],
                 "units": {k: {"kind": r["kind"], "busy": r["machine"]["busy"], "minutes": r["machine"]["seconds"] / 60,
                               "start": r["machine"]["start"], "end": r["machine"]["end"], "same_as": r["result"].get("same_as"),
                               "rebuilt_start": r["result"].get("start_restored")}
                           for k, r in records.items()}}
    if "base-test" in records:
        out["base_test"] = records["base-test"]["result"]["test"]["summary"]
    out["C1"] = A.c1(records, cfg)
    out["sft_end"] = {k: {"step": r["result"]["grid"][-1]["step"], **r["result"]["grid"][-1]["summary"]}
                      for k, r in sorted(records.items()) if k.startswith("sft-")}
    if "screen" in records:
        r = records["screen"]["result"]
        out["screen"] = {"start": r["start"], "qualifying": r["qualifying"], "pool": len(r["pool"]), "summary": r["summary"],
                         "short": len(r["pool"]) < cfg["screen"]["min_pool"]}
    decision = A.pilot_decision(records, cfg)
    out["pilot"] = {"status": decision["status"], "passing": decision["passing"], "settings": decision["settings"],
                    "runs": {k: {**v, "test_before": records[k]["result"]["start_test"]["summary"]["greedy_accuracy"],
                                 "test_after": records[k]["result"]["test"]["summary"]["greedy_accuracy"],
                                 "test_change": A.test_change(records[k]["result"]),
                                 "settings": records[k]["params"]["settings"]} for k, v in decision["checks"].items()}}
    seeds = cfg["arms"]["seeds"]
    arms = {}
    for arm in ("ce_best_acc", "ce_turning", "aesl_end", "dft_end", "rl_only"):
        got = {s: records[f"rl-{arm}-s{s}"]["result"] for s in seeds + cfg["arms"]["sanity_seeds"] if f"rl-{arm}-s{s}" in records}
        if got:
            arms[arm] = {"seeds": sorted(got), "start": {s: g["start"] for s, g in got.items()},
                         "before": {s: g["start_test"]["summary"]["greedy_accuracy"] for s, g in got.items()},
                         "after": {s: g["test"]["summary"]["greedy_accuracy"] for s, g in got.items()},
                         "test_change": {s: A.test_change(g) for s, g in got.items()},
                         "manipulation": A.manipulation(records, arm, sorted(got), cfg)["runs"]}
    out["arms"] = arms
    if decision["status"] == "passed":
        out["comparisons"] = {name: {"a": a, "b": b, "role": role, **A.compare(records, a, b, seeds, cfg)}
                              for name, (a, b, role) in comparisons(cfg).items()}
    return out


def comparisons(cfg: dict) -> dict:
    """name -> (A, B, role): "A beats B"."""
    out = {"C2: CE turning point vs CE best accuracy": ("ce_turning", "ce_best_acc", "verdict"),
           "C3 (tested part): AESL end vs CE best accuracy": ("aesl_end", "ce_best_acc", "verdict"),
           "AESL end vs CE turning point": ("aesl_end", "ce_turning", "secondary")}
    if cfg["arms"]["dft"]:
        out["AESL end vs DFT end"] = ("aesl_end", "dft_end", "secondary")
    return out


def _change(t: dict) -> str:
    """RL's paired effect on test accuracy as one cell (`analysis.test_change`)."""
    return f"{_f(t['before'])} -> {_f(t['after'])} ({t['lost']} / {t['gained']}, p {_f(t['mcnemar_p'])})"


EXPLORATORY_LABELS = {"distinct_answers": "distinct final answers", "pass_gap": "pass@k - pass@1"}


def _exploratory_lines(c: dict, cfg: dict) -> list[str]:
    """Plan amendment 4: declines from each seed's best-accuracy step to the end, beside (not instead of) the verdict."""
    rows = {k: e for k, e in c.get("exploratory", {}).items() if e.get("seeds")}
    if not rows:
        return []
    lines = ["Exploratory (plan amendment 4, not verdict-bearing): from each seed's best-accuracy step to step "
             f"{cfg['sft']['max_steps']}, paired by seed and problem. Accuracy changes far less over this span than after the format step, "
             "so wrong answers weigh less in these declines.", "",
             "| measure | at best accuracy | at the end | decline [95 % CI] | one-sided sign-flip p | seeds' declines |", "|---|---|---|---|---|---|"]
    for k, e in rows.items():
        lines.append(f"| {EXPLORATORY_LABELS.get(k, k)} | {_f(e['at_best'])} | {_f(e['at_end'])} | {_interval(e['decline'])} | "
                     f"{_f(e['sign_flip_p_one_sided'])} | {', '.join(f'{m:+.3f}' for m in e['seed_declines'])} |")
    return lines + [""]


def _c1_lines(c: dict, cfg: dict) -> list[str]:
    k = cfg["c1"]
    lines = ["## C1: a diversity turning point in cold-start SFT (CE)", "",
             f"Seeds recorded: {c['recorded']} (planned {c['planned']}{' + extra' if c['recorded'] > c['planned'] else ''}); the paper's score "
             f"D = entropy - self-BLEU, read from the first grid point with sample boxed rate >= {k['format_level']}; a turning point when a "
             f"later point is more than {k['noise_k']} bootstrap SEs of the difference below the peak. Turning point found in "
             f"{c['detected']} of {c['recorded']} seeds; format never learned in {c['format_not_learned']}.", ""]
    if "decline" in c:
        lines += [f"**C1 verdict: {c['verdict']}**{' (provisional: not every planned seed is recorded)' if c['recorded'] < c['planned'] else ''}. "
                  f"Primary measure `{c['measure']}` (among k = {cfg['eval']['samples']}), the paper's peak minus step {cfg['sft']['max_steps']}, "
                  f"paired by seed and problem: {_interval(c['decline'])} (95 % hierarchical bootstrap), one-sided sign-flip p "
                  f"{_f(c['sign_flip_p_one_sided'])} over seeds (needs <= {k['alpha']}), seeds' declines {', '.join(f'{m:+.3f}' for m in c['seed_means'])}; "
                  f"refuted if the interval's upper end is below {k['sesoi']}; detectable effect (80 % power) {_f(c['mde'])}.", ""]
    else:
        lines += [f"**C1 verdict: {c['verdict']}**", ""]
    lines += _exploratory_lines(c, cfg)
    lines += ["| seed | format step | peak (D) | confirmed | drop at | best-accuracy step | decline | why |", "|---|---|---|---|---|---|---|---|"]
    for x in c["seeds"]:
        lines.append(f"| {x['seed']} | {_f(x['format_step'])} | {_f(x['peak_step'])} | {'yes' if x['detected'] else 'no'} | {_f(x['drop_step'])} | "
                     f"{x['best_accuracy_step']} | {_f(x.get('decline'))} | {x['reason']} |")
    if c["seeds"]:
        lines += ["", "Validation grid, mean over recorded seeds:", "", "| step | " + " | ".join(label for _, label in CURVE) + " |",
                  "|---" * (len(CURVE) + 1) + "|"]
        for i, point in enumerate(c["seeds"][0]["curve"]):
            cells = [_f(_mean([x["curve"][i].get(key) for x in c["seeds"] if i < len(x["curve"])])) for key, _ in CURVE]
            lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    return lines


def _sft_end_lines(s: dict) -> list[str]:
    if not s["sft_end"]:
        return []
    lines = ["", "## End of SFT on the validation problems (descriptive)", "", "| unit | step | " + " | ".join(label for _, label in CURVE[:-2]) + " |",
             "|---|---" + "|---" * len(CURVE[:-2]) + "|"]
    for k, e in s["sft_end"].items():
        lines.append(f"| {k} | {e['step']} | " + " | ".join(_f(e.get(key)) for key, _ in CURVE[:-2]) + " |")
    return lines


def rl_settings(settings: dict | None, cfg: dict) -> str:
    """A pilot unit's RL settings in words: lr and passes over the pool, each from `settings` or else the plan's `rl`
    ("-" for none: no pilot passed)."""
    if settings is None:
        return "-"
    words = f"lr {settings.get('lr', cfg['rl']['lr']):g}, {settings.get('passes', cfg['rl']['passes'])} passes over the pool"
    others = {k: v for k, v in settings.items() if k not in ("lr", "passes")}
    words += "".join(f", {k} {v}" for k, v in sorted(others.items()))
    return words + (" (the plan's settings)" if not settings else "")


def _pilot_lines(s: dict, cfg: dict) -> list[str]:
    lines = ["", "## RL pilot (decides whether C2 / C3 can be tested here)", ""]
    if "screen" in s:
        sc = s["screen"]
        lines.append(f"Screen: {sc['start']} sampled {cfg['screen']['samples']} completions for each of {cfg['screen']['prompts']} RL prompts; "
                     f"{sc['qualifying']} were solved {cfg['screen']['min_solved']}-{cfg['screen']['max_solved']} times; the pool holds {sc['pool']}"
                     + (f" (fewer than {cfg['screen']['min_pool']}: the pool is what qualified)." if sc["short"] else "."))
    p = cfg["pilot"]
    lines += ["", f"Pass rule: pool reward (math_accuracy + {cfg['rl']['reward_weights'][1]} x boxed_format) of the last pass minus the first, "
              f"paired by prompt, >= {p['min_gain']} and > {p['se_k']} SE; sample boxed rate of the last pass >= {p['min_boxed']}; mean token "
              f"entropy of the last pass >= {p['min_entropy_ratio']} x the first pass's.", "",
              "| unit | settings | reward first -> last pass | gain (SE) | boxed last pass | entropy first -> last | test acc before -> after (lost / gained, McNemar p) | pass |",
              "|---|---|---|---|---|---|---|---|"]
    for k, r in s["pilot"]["runs"].items():
        lines.append(f"| {k} | {rl_settings(r['settings'], cfg)} | {_f(r.get('first'))} -> {_f(r.get('last'))} | {_f(r['gain'])} ({_f(r['se'])}) | "
                     f"{_f(r.get('boxed_rate_last'))} | {_f(r.get('entropy_first'))} -> {_f(r.get('entropy_last'))} | "
                     f"{_change(r['test_change'])} | {'pass' if r['pass'] else 'FAIL (' + ', '.join(c for c, ok in r['checks'].items() if not ok) + ')'} |")
    status = s["pilot"]["status"]
    lines += ["", {"pending": "Pilot outcome: pending.", "passed": f"Pilot outcome: **passed** ({s['pilot']['passing']}); every arm runs RL with "
                   f"{rl_settings(s['pilot']['settings'], cfg)}, over the same pool in the same order.",
                   "failed": "Pilot outcome: **failed** (every remedy tried). C2 and C3 are **untestable on this hardware**: RL from the best "
                   "CE checkpoint does not raise the pool reward by the plan's margin (numbers above); the compute goes to C1 seeds."}[status]]
    return lines


def _rl_lines(s: dict, cfg: dict) -> list[str]:
    lines = ["", "## C2 and C3 (test greedy accuracy after identical RL, paired by seed and problem)", ""]
    if s["pilot"]["status"] == "failed":
        return lines + ["C2: **untestable on this hardware**. C3: **untestable on this hardware** (see the pilot above)."]
    if s["pilot"]["status"] == "pending" or not s.get("comparisons"):
        return lines + ["Not run yet (the arms start once the pilot passes)."]
    lines += ["| comparison | seeds | A - B [95 % CI] | Fisher-combined McNemar p | seeds' means | MDE | manipulation (A, B) | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in s["comparisons"].items():
        if c["verdict"] == "not run":
            lines.append(f"| {name} | 0 | - | - | - | - | - | not run |")
            continue
        m = c["manipulation"]
        manip = ", ".join(f"{v['passed']}/{v['units']}" for v in m.values())
        provisional = " (provisional)" if len(c["seeds"]) < c["planned"] else ""
        label = f"**{c['verdict']}**{provisional}" if c["role"] == "verdict" else f"{c['verdict']} (secondary)"
        same = f"; same start in seeds {c['same_start_seeds']}" if c["same_start_seeds"] else ""
        lines.append(f"| {name}{same} | {len(c['seeds'])} | {_interval(c['difference'])} | {_f(c['fisher_mcnemar_p'])} | "
                     f"{', '.join(f'{x:+.3f}' for x in c['seed_means'])} | {_f(c['mde'])} | {manip} | {label} |")
    v = cfg["verdicts"]
    lines += ["", f"Supported: interval above 0, Fisher-combined McNemar p < {v['alpha']} and every seed's mean > 0; refuted: upper end below "
              f"{v['sesoi']} (no gain of {v['sesoi'] * 100:.0f} points or more); opposite: interval below 0 with p < {v['alpha']}. C3 here tests only "
              "\"AESL + RL beats CE (best accuracy) + RL\". A comparison is read only if the manipulation check (last pass minus first pass of the "
              "pool reward > 2 SE, paired by prompt) passed in most RL units of both arms. The Fisher-combined p joins each seed's two-sided "
              "McNemar test, so it is small whenever some seed's arms differ, in either direction: it says the starts are not interchangeable, "
              "and the interval and the seeds' means say which way."]
    lines += ["", "RL's effect on the test problems (plan amendment 4, exploratory): after minus before, paired by problem. C2 and C3 say which "
              "start ends better after this RL budget, not that RL improved it.",
              "", "| arm | seed | start | test acc before -> after RL (lost / gained, McNemar p) | pool reward gain (SE) | manipulation |",
              "|---|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
        for seed in a["seeds"]:
            m = a["manipulation"].get(seed, {})
            lines.append(f"| {arm}{' (sanity, not verdict-bearing)' if arm == 'rl_only' else ''} | {seed} | {a['start'][seed]} | "
                         f"{_change(a['test_change'][seed])} | {_f(m.get('gain'))} ({_f(m.get('se'))}) | {'pass' if m.get('pass') else 'fail'} |")
    return lines


def cpu_label(cpu: dict | None) -> str:
    """A unit's CPU as the report names it: the model and whether it has bf16 vector instructions (plan amendment 3:
    unit costs differ between the study's machines)."""
    if not cpu:
        return "-"
    flags = cpu.get("flags") or []
    isa = "avx512_bf16" if "avx512_bf16" in flags else "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{cpu.get('model') or '?'} ({isa})"


def _busy(u: dict) -> str:
    """A reuse unit did no work, so it has no load of its own to judge ('-')."""
    return "-" if u["kind"] == "reuse" else "yes" if u["busy"] else "no"


def plan_label(plan: Path) -> str:
    """'plan amendments 1-4' from the plan's `## Amendment N` headings (the amendments the report follows), or
    'plan' where the plan has none or is not beside the records."""
    try:
        numbers = sorted({int(m) for m in re.findall(r"^## Amendment (\d+)\b", plan.read_text(), flags=re.M)})
    except OSError:
        numbers = []
    if not numbers:
        return "plan"
    return f"plan amendment {numbers[0]}" if len(numbers) == 1 else f"plan amendments {numbers[0]}-{numbers[-1]}"


def _unit_lines(s: dict) -> list[str]:
    lines = ["", "## Units (commit and load average at start / end; busy units do not set budgets)", "",
             "| unit | kind | minutes | busy | CPU | commit start / end | load start / end |", "|---|---|---|---|---|---|---|"]
    for k, u in sorted(s["units"].items()):
        lines.append(f"| {k}{' = ' + u['same_as'] if u['same_as'] else ''} | {u['kind']} | {u['minutes']:.1f} | {_busy(u)} | "
                     f"{cpu_label(u['start'].get('cpu'))} | {u['start']['commit']} / {u['end']['commit']} | "
                     f"{u['start']['loadavg'][0]:.2f} / {u['end']['loadavg'][0]:.2f} |")
    rebuilt = [f"{k} (from {u['rebuilt_start']['unit']} step {u['rebuilt_start']['step']})" for k, u in sorted(s["units"].items()) if u.get("rebuilt_start")]
    if rebuilt:
        lines += ["", "Started from a snapshot rebuilt from its SFT record on a new machine (greedy validation identical to the record on "
                  f"every problem; minutes exclude the rebuild): {', '.join(rebuilt)}."]
    lines += ["", "The scheduler's estimate of a kind is the median of its latest idle units, on whichever CPU ran them (column above).",
              "", "| kind | plan's estimate (min) | median of idle units (min) | idle / busy units |", "|---|---|---|---|"]
    for kind, est in s["estimates"].items():
        c = s["costs"].get(kind, {"median_seconds": None, "idle_units": 0, "busy_units": 0})
        lines.append(f"| {kind} | {est / 60:.0f} | {_f(c['median_seconds'] / 60 if c['median_seconds'] else None, 1)} | {c['idle_units']} / {c['busy_units']} |")
    return lines


def write(cfg: dict, store: UnitStore, out: Path) -> Path:
    records = store.records()
    s = summarise(cfg, records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(strict_json(s), indent=1, sort_keys=True, allow_nan=False) + "\n")
    plan = plan_label(out / "plan.md")
    lines = [f"# Real-model study ({plan}): results", "",
             f"SmolLM2-135M-Instruct ({cfg['model']}) on the word problems. Rebuilt by `python experiments/real_study.py --report` from "
             f"`units/*.json` alone ({len(records)} units); the plan is plan.md ({plan}).", ""]
    if "base_test" in s:
        b = s["base_test"]
        lines += [f"Base model on {b['problems']} test problems, greedy: accuracy {_f(b['greedy_accuracy'])}, boxed rate {_f(b['greedy_boxed_rate'])}, "
                  f"{_f(b['greedy_tokens'], 1)} tokens.", ""]
    lines += _c1_lines(s["C1"], cfg) + _sft_end_lines(s) + _pilot_lines(s, cfg) + _rl_lines(s, cfg) + _unit_lines(s)
    try:
        from real.figures import write_figures

        figures = write_figures(s, out)
        if figures:
            lines += ["", "Figures: " + ", ".join(f"`{p.name}`" for p in figures) + "."]
    except ImportError:
        pass
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
