"""The strategy world's figures: the diversity curve during CE SFT (ground truth beside the paper's signals), and
test accuracy after RL per arm with a seed-bootstrap interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _x(step: int) -> float:
    return 0.5 if step == 0 else float(step)  # step 0 drawn left of step 1 on the log axis


def curve_figure(s: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [c for c in ("narrow", "best", "all") if s.get(f"C1_{c}", {}).get("seeds")]
    if not worlds:
        return None
    keys = [("strategy_entropy", "strategy entropy (bits, ground truth)"), ("token_entropy", "token entropy (nats)"),
            ("self_bleu", "self-BLEU"), ("target_rate", "target-format rate"), ("greedy_accuracy", "greedy accuracy")]
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        seeds = s[f"C1_{world}"]["seeds"]
        steps = [p["step"] for p in seeds[0]["curve"]]
        for key, label in keys:
            values = np.array([[p[key] if p[key] is not None else np.nan for p in x["curve"]] for x in seeds], dtype=float)
            ax.plot([_x(t) for t in steps], np.nanmean(values, axis=0), marker="o", ms=3, label=label)
        peaks = [x["paper"]["peak_step"] for x in seeds if x["paper"]["peak_step"] is not None]
        if peaks:
            ax.axvline(_x(int(np.median(peaks))), color="grey", ls="--", lw=1, label="paper-rule peak (median)")
        ax.set_xscale("log")
        ax.set_xlabel("SFT step (0 drawn at 0.5)")
        ax.set_title(f"CE on the '{world}' cold start, mean of {len(seeds)} seeds")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "diversity_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_figure(s: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = s.get("arms") or {}
    if not arms:
        return None
    rng = np.random.default_rng(0)
    names, means, lows, highs, before = [], [], [], [], []
    for arm, a in arms.items():
        acc = np.array(a["test_accuracy"], dtype=float)
        boot = rng.choice(acc, size=(4000, len(acc))).mean(axis=1)
        names.append(arm)
        means.append(acc.mean())
        lows.append(acc.mean() - np.quantile(boot, 0.025))
        highs.append(np.quantile(boot, 0.975) - acc.mean())
        before.append(np.mean(a["start_accuracy"]))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(names))
    ax.bar(x, means, yerr=[lows, highs], capsize=3, label="after RL (95 % seed bootstrap)")
    ax.scatter(x, before, color="black", zorder=3, s=12, label="before RL")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (greedy, target format)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_after_rl.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(s: dict, out: Path) -> list[Path]:
    return [p for p in (curve_figure(s, out), accuracy_figure(s, out)) if p is not None]
