"""The paper's diversity figure from a run's TensorBoard logs: entropy and self-BLEU fall as SFT over-fits.

    python -m aesl_lightning.plots <run_dir> [--out fig.png]

Top panel: entropy (`val/gen_entropy`, else `val/token_entropy`) on the left axis and self-BLEU
(`val/self_bleu`) on the right, against the optimiser step. Bottom panel: answer accuracy
(`val/answer_accuracy`) and, when present, the smoothed diversity score of `DiversityEarlyStopping`.
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

    Built without pyplot (it renders with Agg and leaves the caller's backend and open figures alone).
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

    fig = Figure(figsize=(8, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    lines = []
    if entropy_tag:
        steps, values = scalars[entropy_tag]
        label = "entropy (sampled)" if entropy_tag == "val/gen_entropy" else "entropy (teacher-forced)"
        lines += top.plot(steps, values, "o-", color="tab:blue", ms=3, label=f"{label} [{entropy_tag}]")
        top.set_ylabel("entropy (nats)", color="tab:blue")
        top.tick_params(axis="y", labelcolor="tab:blue")
    else:
        top.set_yticks([])
    if SELF_BLEU_TAG in scalars:
        right = top.twinx()
        steps, values = scalars[SELF_BLEU_TAG]
        lines += right.plot(steps, values, "s-", color="tab:red", ms=3, label=f"self-BLEU [{SELF_BLEU_TAG}]")
        right.set_ylabel("self-BLEU (lower = more diverse)", color="tab:red")
        right.tick_params(axis="y", labelcolor="tab:red")

    lower = []
    if ACCURACY_TAG in scalars:
        steps, values = scalars[ACCURACY_TAG]
        lower += bottom.plot(steps, values, "^-", color="tab:green", ms=3, label=f"answer accuracy [{ACCURACY_TAG}]")
        bottom.set_ylim(-0.02, 1.1 * max([0.1, *values]))  # a fraction: keep 0 in view
        bottom.set_ylabel("answer accuracy", color="tab:green")
        bottom.tick_params(axis="y", labelcolor="tab:green")
    else:
        bottom.set_yticks([])
    if SCORE_TAG in scalars:
        right = bottom.twinx()
        steps, values = scalars[SCORE_TAG]
        label = f"diversity score, smoothed [{SCORE_TAG}]"
        lower += right.plot(steps, values, "-", color="tab:purple", alpha=0.7, label=label)
        right.set_ylabel("diversity score", color="tab:purple")
        right.tick_params(axis="y", labelcolor="tab:purple")
    bottom.set_xlabel("step")

    for ax, handles in ((top, lines), (bottom, lower)):
        if tp_step is not None:
            handles.append(ax.axvline(tp_step, color="black", ls="--", lw=1.2, label=f"turning point (step {tp_step})"))
        ax.grid(alpha=0.3)
        if handles:
            # Above the panel: inside, it would hide curves of one of the two y-axes.
            ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01, 1, 0.1), mode="expand",
                      ncol=2, fontsize=8, frameon=False, borderaxespad=0)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    title = f"Output diversity during SFT: {run_dir.name}"
    fig.suptitle(title + (f"\n(not logged: {', '.join(missing)})" if missing else ""), fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aesl_lightning.plots", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run's log folder (e.g. lightning_logs/version_0)")
    parser.add_argument("--out", default=None, help="PNG to write (default: <run_dir>/diversity.png)")
    args = parser.parse_args(argv)
    print(plot_diversity(args.run_dir, args.out))


if __name__ == "__main__":
    main()
