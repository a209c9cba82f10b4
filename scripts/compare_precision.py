"""Does bf16-mixed train the same model as fp32, and how much faster is a real run? Run one fit config once per
precision (each through `scripts/record_run.py`, so each run is recorded with its commit, load and series) and compare
what the two runs measured, step by step.

    python scripts/compare_precision.py                  # the quickstart in fp32 and in bf16-mixed (~17 min idle)
    python scripts/compare_precision.py --report         # only rebuild comparison.md / comparison.json from the run.json files
    python scripts/compare_precision.py --out /tmp/p -- --trainer.max_steps 4    # everything after -- goes to both fits
    python scripts/compare_precision.py --control        # also fp32 on one thread against fp32: control.md / control.json

The tolerances were written before any comparison run (issue 23). The candidate precision *matches* the reference
when all of these hold:
- the validation loss (teacher-forced, no sampling) differs by at most 3 % (relative) at every validation;
- the training loss differs by at most 3 % (relative) in the median over the steps;
- greedy answer accuracy differs by at most one prompt at every validation. The quickstart generates for 8 prompts,
  so one prompt (0.125) is the finest difference it can resolve; agreement here is no evidence of a smaller one.
Sampled measures (token entropy of the samples, distinct answers, boxed rate) are reported but not judged. The two
precisions draw different samples from the same seed, so these differ by sampling noise even between equal models.
The speed-up is each run's wall time, and its generation time, as a ratio. It is an idle figure only when both
records are idle.

The control (`--control`) asks how far the same fit drifts under a perturbation far smaller than bf16's rounding: fp32
again, with one torch thread instead of the default, which only changes the order of some floating-point reductions
(results differ in the last bits). It is judged by the same tolerances. Where the control also misses them, a miss of
bf16-mixed at the same steps says more about how sensitive those steps are than about bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from aesl_lightning.study.report import read_json, write_json  # noqa: E402

REFERENCE, CANDIDATE, CONTROL = "32-true", "bf16-mixed", "32-true-1-thread"
# each run: its folder under --out, the Trainer precision, and the environment it runs in
RUNS = {REFERENCE: ("32-true", {}), CANDIDATE: ("bf16-mixed", {}), CONTROL: ("32-true", {"OMP_NUM_THREADS": "1"})}
VAL_LOSS_TOL = 0.03       # relative, at every validation
TRAIN_LOSS_TOL = 0.03     # relative, median over the steps
REPORTED = ("val/token_entropy", "val/gen_entropy", "val/distinct_answers", "val/boxed_rate", "val/self_bleu")


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def _series(record: dict, tag: str) -> dict[int, float]:
    return {int(step): tags[tag] for step, tags in record["series_by_step"].items() if tag in tags}


def compare(ref: dict, cand: dict, prompts: int | None = None, names: tuple[str, str] = (REFERENCE, CANDIDATE)) -> dict:
    """The comparison of two run records (`record_run.py`'s run.json) against the tolerances in the module docstring.
    `prompts`: how many prompts the greedy accuracy is over (one prompt = 1 / prompts); read from the config when None.
    `names`: the two runs' names in the result."""
    for name, record in (("reference", ref), ("candidate", cand)):
        if record.get("returncode") != 0 or "series_by_step" not in record:
            raise ValueError(f"the {name} run did not finish ({record.get('error', 'no series')}): nothing to compare")
    rows, failures = [], []
    ref_val, cand_val = _series(ref, "val/loss"), _series(cand, "val/loss")
    steps = sorted(set(ref_val) & set(cand_val))
    if not steps:
        raise ValueError("the two runs share no validation step")
    one_prompt = 1.0 / prompts if prompts else None
    ref_acc, cand_acc = _series(ref, "val/answer_accuracy"), _series(cand, "val/answer_accuracy")
    for step in steps:
        row = {"step": step, "val_loss": [ref_val[step], cand_val[step]], "val_loss_rel_diff": _relative(ref_val[step], cand_val[step])}
        if step in ref_acc and step in cand_acc:
            row["greedy_accuracy"] = [ref_acc[step], cand_acc[step]]
        for tag in REPORTED:
            a, b = _series(ref, tag).get(step), _series(cand, tag).get(step)
            if a is not None and b is not None:
                row[tag.removeprefix("val/")] = [a, b]
        rows.append(row)
        if row["val_loss_rel_diff"] > VAL_LOSS_TOL:
            failures.append(f"validation loss at step {step}: {ref_val[step]:.4f} vs {cand_val[step]:.4f} "
                            f"({row['val_loss_rel_diff']:.1%} > {VAL_LOSS_TOL:.0%})")
        if "greedy_accuracy" in row and one_prompt is not None and abs(ref_acc[step] - cand_acc[step]) > one_prompt + 1e-9:
            failures.append(f"greedy accuracy at step {step}: {ref_acc[step]:.3f} vs {cand_acc[step]:.3f} (more than one prompt of {prompts})")
    ref_train, cand_train = _series(ref, "train/loss"), _series(cand, "train/loss")
    train_steps = sorted(set(ref_train) & set(cand_train))
    train_rel = [_relative(ref_train[s], cand_train[s]) for s in train_steps]
    train = {"steps": len(train_steps), "median_rel_diff": statistics.median(train_rel) if train_rel else None,
             "max_rel_diff": max(train_rel) if train_rel else None}
    if not train_rel:
        failures.append("no training loss in either record (record_run.py before it kept train/loss)")
    elif train["median_rel_diff"] > TRAIN_LOSS_TOL:
        failures.append(f"training loss: median relative difference {train['median_rel_diff']:.1%} > {TRAIN_LOSS_TOL:.0%}")
    ref_gen, cand_gen = sum(ref.get("generation_seconds", {}).values()), sum(cand.get("generation_seconds", {}).values())
    speed = {"wall_seconds": [ref["wall_seconds"], cand["wall_seconds"]], "wall_speedup": ref["wall_seconds"] / cand["wall_seconds"],
             "generation_seconds": [ref_gen, cand_gen], "generation_speedup": ref_gen / cand_gen if cand_gen else None,
             "rest_seconds": [ref["wall_seconds"] - ref_gen, cand["wall_seconds"] - cand_gen],
             "both_idle": bool(ref.get("idle")) and bool(cand.get("idle"))}
    rest = speed["rest_seconds"]
    speed["rest_speedup"] = rest[0] / rest[1] if rest[1] > 0 else None
    return {"matches": not failures, "failures": failures, "validations": rows, "train_loss": train, "speed": speed,
            "resolution": {"greedy_accuracy_prompts": prompts},
            "tolerances": {"val_loss_rel": VAL_LOSS_TOL, "train_loss_median_rel": TRAIN_LOSS_TOL, "greedy_accuracy": "one prompt"},
            "runs": {p: {"command": r["command"], "commit": r["commit"], "idle": r.get("idle"), "cpu": r["machine"]["start"].get("cpu"),
                         "verdict": r.get("verdict"), "threads": r.get("threads")} for p, r in zip(names, (ref, cand))}}


def markdown(result: dict, names: tuple[str, str]) -> str:
    a, b = names
    s, t = result["speed"], result["train_loss"]
    cpu = (result["runs"][a].get("cpu") or {})
    lines = [f"# {b} against {a} on one fit", "",
             f"Rebuilt by `python scripts/compare_precision.py --report` from `{a}/run.json` and `{b}/run.json`; "
             "tolerances in the script's docstring (written before the runs).", "",
             f"**Verdict: {b} {'matches' if result['matches'] else 'does not match'} {a}** within the stated tolerances."]
    lines += [f"- {f}" for f in result["failures"]]
    lines += ["", f"Machine: {cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, "
              f"{'avx512_bf16' if 'avx512_bf16' in cpu.get('flags', []) else 'no avx512_bf16'}; both runs idle: {s['both_idle']}"
              + "".join(f"; {n} threads: {result['runs'][n]['threads']}" for n in names if result["runs"][n].get("threads"))
              + ".", "",
              "| | " + a + " | " + b + " | speed-up |", "|---|---|---|---|",
              f"| wall time | {s['wall_seconds'][0]:.0f} s | {s['wall_seconds'][1]:.0f} s | {s['wall_speedup']:.2f}x |",
              f"| of which generation (validations) | {s['generation_seconds'][0]:.0f} s | {s['generation_seconds'][1]:.0f} s | "
              + (f"{s['generation_speedup']:.2f}x |" if s["generation_speedup"] else "- |"),
              f"| the rest (training, loading, writing) | {s['rest_seconds'][0]:.0f} s | {s['rest_seconds'][1]:.0f} s | "
              + (f"{s['rest_speedup']:.2f}x |" if s["rest_speedup"] else "- |"), ""]
    if t["median_rel_diff"] is not None:
        lines += [f"Training loss over {t['steps']} steps: median relative difference {t['median_rel_diff']:.2%}, "
                  f"largest {t['max_rel_diff']:.2%}.", ""]
    extra = [k for k in ("greedy_accuracy",) + tuple(x.removeprefix("val/") for x in REPORTED) if any(k in r for r in result["validations"])]
    lines += ["| step | val loss | rel. diff | " + " | ".join(extra) + " |", "|---" * (3 + len(extra)) + "|"]
    for r in result["validations"]:
        cells = [f"{r[k][0]:.3f} / {r[k][1]:.3f}" if k in r else "-" for k in extra]
        lines.append(f"| {r['step']} | {r['val_loss'][0]:.4f} / {r['val_loss'][1]:.4f} | {r['val_loss_rel_diff']:.2%} | " + " | ".join(cells) + " |")
    lines += ["", f"Each cell is {a} / {b}. Greedy accuracy is over {result['resolution']['greedy_accuracy_prompts']} prompts. "
              "Sampled measures differ by sampling noise even between equal models (the two precisions draw different samples), "
              "so they are shown, not judged.", "",
              f"Verdicts at the end of each run: {a}: {result['runs'][a]['verdict']} / {b}: {result['runs'][b]['verdict']}", ""]
    return "\n".join(lines)


def prompts_of(record: dict) -> int | None:
    """How many validation prompts a run's greedy accuracy is over, read from its recorded command: the last
    `--model.val_generation.num_prompts` override, else the config's value."""
    import shlex

    import yaml

    words = shlex.split(record["command"])
    for i in range(len(words) - 2, -1, -1):
        if words[i] == "--model.val_generation.num_prompts":
            return int(words[i + 1])
    config = Path(words[words.index("--config") + 1])
    cfg = yaml.safe_load((config if config.is_absolute() else ROOT / config).read_text())
    model = cfg.get("model") or {}
    model = model.get("init_args", model)  # a class_path + init_args block, or the arguments themselves
    return (model.get("val_generation") or {}).get("num_prompts")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/quickstart.yaml", help="the fit config (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "precision",
                        help="<out>/<precision>/run.json per run, <out>/comparison.{md,json} (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="compare the existing run.json files; run nothing")
    parser.add_argument("--rerun", action="store_true", help="run both fits even where a run.json exists")
    parser.add_argument("--control", action="store_true",
                        help=f"also run {CONTROL} (fp32, one thread) and compare it with {REFERENCE}: control.md / control.json")
    args = parser.parse_args(own)

    import record_run

    pairs = [((REFERENCE, CANDIDATE), "comparison")] + ([((REFERENCE, CONTROL), "control")] if args.control else [])
    names = list(dict.fromkeys(n for pair, _ in pairs for n in pair))
    if not args.report:
        for name in names:
            if args.rerun or not (args.out / name / "run.json").is_file():
                precision, env = RUNS[name]
                print(f"== {name}", flush=True)
                with _environment(env):
                    record_run.main(["--config", args.config, "--out", str(args.out / name), "--", *extra, "--trainer.precision", precision])
    missing = [n for n in names if not (args.out / n / "run.json").is_file()]
    if missing:
        raise SystemExit(f"{args.out}: no run.json for {', '.join(missing)}; run without --report first")
    for pair, stem in pairs:
        ref, cand = (read_json(args.out / n / "run.json") for n in pair)
        result = compare(ref, cand, prompts_of(ref), names=pair)
        write_json(args.out / f"{stem}.json", result)
        (args.out / f"{stem}.md").write_text(markdown(result, pair), encoding="utf-8")
        print(f"{args.out / (stem + '.md')}: {pair[1]} {'matches' if result['matches'] else 'does not match'} {pair[0]}; "
              f"wall {result['speed']['wall_speedup']:.2f}x")
    return 0


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set for the fits started inside (record_run passes its environment on), restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    raise SystemExit(main())
