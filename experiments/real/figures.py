"""The real study's figures: the validation grid of CE SFT (each diversity measure against step, per seed, the paper's
peak marked) and test accuracy before and after RL per arm."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MEASURES = (("distinct_answers", "distinct answers (of k)"), ("pass@k_minus_pass@1", "pass@k - pass@1"),
            ("distinct_paths", "distinct paths (boxed samples)"), ("score", "D = entropy - self-BLEU"),
            ("sample_boxed_rate", "sample boxed rate"), ("greedy_accuracy", "val greedy accuracy"))


def _x(step: int) -> float:
    return 0.5 if step == 0 else float(step)  # step 0 drawn left of step 1 on the log axis


def _figure(*size):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def curve_figure(s: dict, out: Path) -> Path | None:
    seeds = s.get("C1", {}).get("seeds") or []
    if not seeds:
        return None
    fig = _figure(13, 6.5)
    for i, (key, label) in enumerate(MEASURES):
        ax = fig.add_subplot(2, 3, i + 1)
        for x in seeds:
            steps = [p["step"] for p in x["curve"]]
            values = [np.nan if p.get(key) is None else p[key] for p in x["curve"]]
            line = ax.plot([_x(t) for t in steps], values, marker="o", ms=3, lw=1, label=f"seed {x['seed']}")[0]
            if x["peak_step"] is not None:
                ax.axvline(_x(x["peak_step"]), ls="--" if x["detected"] else ":", lw=0.8, color=line.get_color())
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("SFT step (0 drawn at 0.5)", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("CE cold start on the validation grid (dashed: confirmed turning point; dotted: unconfirmed peak)", fontsize=10)
    fig.tight_layout()
    path = out / "diversity_curve.png"
    fig.savefig(path, dpi=110)
    return path


def accuracy_figure(s: dict, out: Path) -> Path | None:
    arms = s.get("arms") or {}
    if not arms:
        return None
    fig = _figure(8, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for i, (arm, a) in enumerate(arms.items()):
        after = [a["after"][x] for x in a["seeds"]]
        before = [a["before"][x] for x in a["seeds"]]
        ax.bar(i, np.mean(after), color="C0", alpha=0.6)
        ax.scatter([i] * len(after), after, color="C0", s=12, zorder=3, label="after RL (seeds)" if i == 0 else None)
        ax.scatter([i] * len(before), before, color="black", marker="x", s=14, zorder=3, label="before RL (seeds)" if i == 0 else None)
    ax.set_xticks(range(len(arms)), list(arms), rotation=20, ha="right")
    ax.set_ylabel("test accuracy (greedy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_after_rl.png"
    fig.savefig(path, dpi=110)
    return path


def write_figures(s: dict, out: Path) -> list[Path]:
    return [p for p in (curve_figure(s, out), accuracy_figure(s, out)) if p is not None]
