"""The paper's diversity figure from a run's TensorBoard logs: entropy and self-BLEU fall as SFT over-fits.

    python -m aesl_lightning.training.plots <run_dir> [--out fig.png]

Top panel: entropy (`val/gen_entropy`, else `val/token_entropy`) on the left axis and self-BLEU
(`val/self_bleu`) on the right, against the optimiser step (symmetric log axis, step 0 shown). Middle panel,
when logged: distinct answers among k and pass@k - pass@1. Bottom panel: answer accuracy
(`val/answer_accuracy`), the format rate (`val/boxed_rate`) and, when present, the smoothed diversity score
of `DiversityEarlyStopping`. `RunSummary` draws it into the run folder at the end of every fit.
The turning point (from `turning_point/turning_point.json`, else the `diversity/turning_point_step`
scalar) is a vertical line on both. Series that the run did not log are named in the title instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ENTROPY_TAGS = ("val/gen_entropy", "val/token_entropy")
SELF_BLEU_TAG = "val/self_bleu"
ACCURACY_TAG = "val/answer_accuracy"
SCORE_TAG = "diversity/score_smoothed"
DISTINCT_ANSWERS_TAG = "val/distinct_answers"
PASS_GAP_TAG = "val/pass_gap"
FORMAT_TAG = "val/boxed_rate"
TURNING_POINT_TAG = "diversity/turning_point_step"

Series = tuple[list[int], list[float]]


def _event_dir(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if any(run_dir.glob("events.out.tfevents.*")):
        return run_dir
    folders = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if len(folders) == 1:
        return folders[0]
    if not folders:
        raise FileNotFoundError(
            f"{run_dir}: no TensorBoard event files (events.out.tfevents.*) in it or below it; "
            "pass a run's log folder, e.g. lightning_logs/version_0"
        )
    raise ValueError(f"{run_dir}: event files in several runs, pick one of: {', '.join(str(f) for f in folders)}")


def read_scalars(run_dir: str | Path) -> dict[str, Series]:
    """Every scalar series of a run as `{tag: (steps, values)}`, sorted by step, the last write per step kept
    (a resumed run may log a step twice)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(_event_dir(Path(run_dir))), size_guidance={SCALARS: 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()[SCALARS]:
        by_step = {}
        for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
            by_step[event.step] = event.value
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out


def turning_point_step(run_dir: str | Path, scalars: dict[str, Series] | None = None) -> int | None:
    """The TensorBoard step of a run's turning point: from `turning_point.json` (in `<run_dir>/turning_point/`
    or `<run_dir>/`) when it records a detected turning point, else the last `diversity/turning_point_step`."""
    run_dir = Path(run_dir)
    for path in (run_dir / "turning_point" / "turning_point.json", run_dir / "turning_point.json"):
        if path.is_file():
            summary = json.loads(path.read_text())
            if summary.get("turning_point"):
                point = summary["turning_point"]
                return int(point.get("log_step", point["step"]))
    scalars = read_scalars(run_dir) if scalars is None else scalars
    if TURNING_POINT_TAG in scalars and scalars[TURNING_POINT_TAG][1]:
        return int(scalars[TURNING_POINT_TAG][1][-1])
    return None


def plot_diversity(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the diversity figure of the run in `run_dir` as a PNG; returns its path
    (default `<run_dir>/diversity.png`)."""
    out = Path(out) if out is not None else Path(run_dir) / "diversity.png"
    fig = diversity_figure(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def diversity_figure(run_dir: str | Path):
    """The diversity figure of the run in `run_dir` as a matplotlib Figure.

    Panels share a symmetric-log step axis (linear in [0, 1], logarithmic above) so step 0 and a
    log-spaced schedule are both readable. A middle panel shows the signals that do not grow with length
    (`val/distinct_answers`, `val/pass_gap`) when the run logged them, with +-1 standard error bars where
    `<tag>_se` was logged; the bottom panel adds the format rate (`val/boxed_rate`). Without a turning point
    the figure says "no turning point within N steps". Built without pyplot (it renders with Agg and leaves
    the caller's backend and open figures alone).
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    entropy_tag = next((t for t in ENTROPY_TAGS if t in scalars), None)
    tp_step = turning_point_step(run_dir, scalars)
    wanted = (
        ("entropy", entropy_tag), ("self-BLEU", SELF_BLEU_TAG in scalars), ("answer accuracy", ACCURACY_TAG in scalars)
    )
    missing = [name for name, present in wanted if not present]
    middle_tags = [t for t in (DISTINCT_ANSWERS_TAG, PASS_GAP_TAG) if t in scalars]

    fig = Figure(figsize=(8, 9.5 if middle_tags else 7), layout="constrained")
    ratios = (3, 2, 2) if middle_tags else (3, 2)
    axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
    top, bottom = axes[0], axes[-1]
    panels = []
    lines = []
    if entropy_tag:
        label = "entropy (sampled)" if entropy_tag == "val/gen_entropy" else "entropy (teacher-forced)"
        lines += _series(top, scalars, entropy_tag, "o-", "tab:blue", f"{label} [{entropy_tag}]")
        top.set_ylabel("entropy (nats)", color="tab:blue")
        top.tick_params(axis="y", labelcolor="tab:blue")
    else:
        top.set_yticks([])
    if SELF_BLEU_TAG in scalars:
        right = top.twinx()
        lines += _series(right, scalars, SELF_BLEU_TAG, "s-", "tab:red", f"self-BLEU [{SELF_BLEU_TAG}]")
        right.set_ylabel("self-BLEU (lower = more diverse)", color="tab:red")
        right.tick_params(axis="y", labelcolor="tab:red")
    panels.append((top, lines))

    if middle_tags:
        middle, handles = axes[1], []
        if DISTINCT_ANSWERS_TAG in scalars:
            handles += _series(middle, scalars, DISTINCT_ANSWERS_TAG, "D-", "tab:orange",
                               f"distinct answers among k [{DISTINCT_ANSWERS_TAG}]")
            middle.set_ylabel("distinct answers", color="tab:orange")
        if PASS_GAP_TAG in scalars:
            right = middle.twinx() if DISTINCT_ANSWERS_TAG in scalars else middle
            handles += _series(right, scalars, PASS_GAP_TAG, "v-", "tab:brown", f"pass@k - pass@1 [{PASS_GAP_TAG}]")
            right.set_ylabel("pass@k - pass@1", color="tab:brown")
        panels.append((middle, handles))

    lower = []
    if ACCURACY_TAG in scalars or FORMAT_TAG in scalars:
        for tag, marker, color, label in ((ACCURACY_TAG, "^-", "tab:green", "answer accuracy"),
                                          (FORMAT_TAG, "x--", "tab:gray", "boxed-answer rate (format)")):
            if tag in scalars:
                lower += _series(bottom, scalars, tag, marker, color, f"{label} [{tag}]")
        bottom.set_ylim(-0.02, 1.05)  # rates: keep 0 and 1 in view
        bottom.set_ylabel("rate", color="tab:green")
    else:
        bottom.set_yticks([])
    if SCORE_TAG in scalars:
        right = bottom.twinx()
        steps, values = scalars[SCORE_TAG]
        label = f"diversity score, smoothed [{SCORE_TAG}]"
        lower += right.plot(steps, values, "-", color="tab:purple", alpha=0.7, label=label)
        right.set_ylabel("diversity score", color="tab:purple")
        right.tick_params(axis="y", labelcolor="tab:purple")
    panels.append((bottom, lower))
    bottom.set_xlabel("optimiser step (symmetric log scale: step 0 shown)")
    bottom.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    val_steps = sorted({s for tag, (steps, _) in scalars.items() if tag.startswith("val/") for s in steps})
    if 0 < len(val_steps) <= 16:
        bottom.set_xticks(val_steps, [str(s) for s in val_steps])

    gated = _gated_steps(run_dir)
    for i, (ax, handles) in enumerate(panels):
        if gated:
            span = ax.axvspan(gated[0], gated[-1], color="gray", alpha=0.15, lw=0,
                              label="format not learned yet: not considered by the rule")
            if i == 0:
                handles.append(span)  # one legend entry for the shading of every panel
        if tp_step is not None:
            handles.append(ax.axvline(tp_step, color="black", ls="--", lw=1.2, label=f"turning point (step {tp_step})"))
        ax.grid(alpha=0.3)
        if handles:
            # Above the panel: inside, it would hide curves of one of the two y-axes.
            ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01, 1, 0.1), mode="expand",
                      ncol=2, fontsize=8, frameon=False, borderaxespad=0)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    if tp_step is None and val_steps:
        top.text(0.99, 0.97, f"no turning point within {val_steps[-1]} steps", ha="right", va="top",
                 transform=top.transAxes, fontsize=9, bbox={"facecolor": "white", "edgecolor": "gray", "alpha": 0.9})
    title = f"Output diversity during SFT: {run_dir.name}"
    fig.suptitle(title + (f"\n(not logged: {', '.join(missing)})" if missing else ""), fontsize=10)
    return fig


def _gated_steps(run_dir: Path) -> list[int]:
    """The logged steps of the validations the turning-point rule did not consider because the format gate was
    still closed (status "format" in turning_point.json), sorted."""
    for path in (run_dir / "turning_point" / "turning_point.json", run_dir / "turning_point.json"):
        if path.is_file():
            history = json.loads(path.read_text()).get("history", [])
            return sorted(int(e.get("log_step", e["step"])) for e in history if e.get("status") == "format")
    return []


def _series(ax, scalars: dict[str, Series], tag: str, style: str, color: str, label: str) -> list:
    """Plot `tag` on `ax`, with +-1 standard error bars when `<tag>_se` was logged at the same steps."""
    steps, values = scalars[tag]
    se = dict(zip(*scalars[f"{tag}_se"])) if f"{tag}_se" in scalars else {}
    if se and all(s in se for s in steps):
        container = ax.errorbar(steps, values, yerr=[se[s] for s in steps], fmt=style, color=color, ms=3, capsize=2,
                                label=label)
        handles = [container]
    else:
        handles = ax.plot(steps, values, style, color=color, ms=3, label=label)
    ax.tick_params(axis="y", labelcolor=color)
    return handles


def verdict(rule, scalars: dict[str, Series] | None = None) -> str:
    """The end-of-run line: "turning point at step X (diversity ..., answer accuracy there ...)" or why there
    is none yet; `rule` is a `TurningPointRule` (None: the run had no DiversityEarlyStopping)."""
    from aesl_lightning.maths.turning_point import explain

    if rule is None:
        return "no turning-point rule in this run (add aesl_lightning.DiversityEarlyStopping to the callbacks)"
    point = rule.turning_point
    if point is None:
        return explain(rule)
    values = ", ".join(f"{k} {v:.3g}" for k, v in point["values"].items() if v is not None and k in rule.config.keys)
    accuracy = ""
    if scalars and ACCURACY_TAG in scalars:
        at = dict(zip(*scalars[ACCURACY_TAG])).get(point.get("log_step", point["step"]))
        accuracy = "" if at is None else f"; answer accuracy there {at:.3g}"
    return f"turning point at step {point['step']} (diversity: {values}{accuracy})"


def draw_at_end_of_fit(run_dir: str | Path, rule=None) -> tuple[Path | None, str]:
    """The figure written into `run_dir` (None if the run has no event files) and the verdict line."""
    try:
        scalars = read_scalars(run_dir)
    except (FileNotFoundError, ValueError):
        return None, verdict(rule)
    return plot_diversity(run_dir), verdict(rule, scalars)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aesl_lightning.training.plots", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run's log folder (e.g. lightning_logs/version_0)")
    parser.add_argument("--out", default=None, help="PNG to write (default: <run_dir>/diversity.png)")
    args = parser.parse_args(argv)
    print(plot_diversity(args.run_dir, args.out))


if __name__ == "__main__":
    main()
