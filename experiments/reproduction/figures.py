"""The figures: the seed-0 CE run's diversity curve, the checkpoint sweep, and the ablation's pass@1 by set size."""

from __future__ import annotations

from pathlib import Path

from aesl_lightning.study.stats import spearman
from reproduction.ablation import DIFFICULTIES


def write_figures(ce_run_dir: Path, out: Path, summary: dict) -> None:
    """`diversity_curve.png` when the CE run's logs are in the work folder; `sweep.png` when the sweep has points."""
    from matplotlib.figure import Figure

    from aesl_lightning.training.plots import plot_diversity

    if (ce_run_dir / "logs").is_dir():
        plot_diversity(ce_run_dir, out / "diversity_curve.png")
    sweep = summary["sweep"]
    if not sweep:
        return
    fig = Figure(figsize=(10, 4))
    post = [s["rl_pass@1"] for s in sweep]
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "sft_accuracy", "SFT validation accuracy (greedy)"),
                           (fig.add_subplot(1, 2, 2), "sft_entropy", "SFT sampling entropy (nats/token)")):
        xs = [s[key] for s in sweep]
        ax.scatter(xs, post)
        for s, x, y in zip(sweep, xs, post):
            ax.annotate(str(s["step"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("post-RL test pass@1")
        ax.set_title(f"Spearman {spearman(xs, post):+.2f}")
    fig.suptitle("Checkpoint sweep: each point is one CE SFT snapshot (step annotated) after the same GRPO")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)


def write_ablation_figure(out: Path, ablation: dict) -> None:
    """`ablation.png`: post-RL pass@1 against set size, one panel per difficulty, CE and AESL with their intervals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    for i, difficulty in enumerate(DIFFICULTIES):
        ax = fig.add_subplot(1, 2, i + 1)
        sizes = sorted({size for size, d in ablation["cells"] if d == difficulty})
        for method, label in (("ce_best_acc", "CE, best val accuracy"), ("aesl", "AESL")):
            means = [ablation["table"][f"{s}/{difficulty}"][method]["pass@1"] for s in sizes]
            ax.errorbar(sizes, [m for m, _ in means], yerr=[h for _, h in means], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cold-start set size")
        ax.set_ylabel("post-RL test pass@1")
        ax.set_title(f"{difficulty} problems")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
