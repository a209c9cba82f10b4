"""results.md and ablation.md from the summaries of `analysis` and the invocations' meta record."""

from __future__ import annotations

from aesl_lightning.study.report import format_mean_ci as fmt
from aesl_lightning.study.report import markdown_table
from reproduction.analysis import SFT_COLUMNS
from reproduction.config import Track

ARM_LABELS = {
    "base": "1. RL from the base model (no SFT)",
    "ce_best_acc": "2. CE, best val accuracy",
    "ce_end": "3. CE, end of training",
    "ce_turning_point": "4. CE, diversity turning point",
    "dft": "5. DFT, end of training",
    "aesl": "6. AESL, end of training",
}


def _header(track: Track, meta: dict) -> list[str]:
    invocations = meta["invocations"]
    return [f"# Reproduction, {track.name} track", "",
            f"Command: `{meta['command']}`  ", f"Seeds: {list(track.seeds)}; data seed {track.data_seed}  ",
            f"Machine: {meta['machine']}  ",
            (f"Wall time: {sum(i['wall_minutes'] for i in invocations):.1f} min over {len(invocations)} invocation(s) ("
             + " + ".join(f"{i['wall_minutes']:.1f}" for i in invocations)
             + f"; a rerun resumes the finished runs); all runs summed over workers: {meta['run_minutes']:.1f} min  "),
            f"Commit: {meta['commit']}", ""]


def _base_lines(track: Track, b: dict | None) -> list[str]:
    if not b:
        return []
    accuracy = (b.get("history") or [{}])[-1].get("val/answer_accuracy", float("nan"))
    return [(f"Base model: Llama architecture, {b['parameters'] / 1e6:.2f}M parameters, pre-trained from scratch for {b['steps']} "
             f"steps on {track.num_pretrain} problems in 3 solution styles ({b['train_seconds'] / 60:.1f} min); on held-out problems "
             f"of the pre-training mix ({track.pretrain_task.min_digits}-{track.pretrain_task.max_digits} digit operands): loss "
             f"{b['val_loss']:.3f}, greedy answer accuracy {accuracy:.3f}. Its numbers on the task itself are the step-0 rows below."), ""]


def _arm_tables(track: Track, arms: dict) -> list[str]:
    k_val, k_eval = track.val_samples, track.eval_samples
    lines = ["## At the SFT checkpoint each arm starts RL from (validation split)", ""]
    lines += markdown_table(["arm", "step", *(label.format(k=k_val) for _, label in SFT_COLUMNS)],
                            ([ARM_LABELS[arm], "/".join("0" if s is None else str(s) for s in e["sft_step"]),
                              *(fmt(*e["sft"][key.format(k=k_val)]["mean_ci"]) for key, _ in SFT_COLUMNS)] for arm, e in arms.items()))
    lines += ["", f"## After the same GRPO budget ({track.grpo_steps} steps x {track.grpo_prompts} prompts x G={track.num_generations})", "",
              (f"Test splits: in-distribution ({track.num_test}) and harder ({track.num_test_hard}: {track.hard_task.min_steps}-"
               f"{track.hard_task.max_steps} operations). pass@1 = mean accuracy of {k_eval} samples, pass@{k_eval} unbiased."), ""]
    keys = [f"{s}/{m}" for s in ("test", "test_hard") for m in ("greedy_accuracy", "pass@1", f"pass@{k_eval}")]
    lines += markdown_table(["arm", "test greedy", "test pass@1", f"test pass@{k_eval}", "hard greedy", "hard pass@1", f"hard pass@{k_eval}"],
                            ([ARM_LABELS[arm], *(fmt(*e["rl"][k]["mean_ci"]) for k in keys)] for arm, e in arms.items()))
    if all("gain/test/pass@1" in e["rl"] for e in arms.values()):
        lines += ["", "### What GRPO changed: before -> after on the same test splits (gain with its 95% interval)", ""]
        rows = []
        for arm, e in arms.items():
            cells = [ARM_LABELS[arm]]
            for split, key in (("test", "pass@1"), ("test", f"pass@{k_eval}"), ("test_hard", "pass@1")):
                b, a = e["rl"][f"before/{split}/{key}"]["mean_ci"][0], e["rl"][f"{split}/{key}"]["mean_ci"][0]
                cells += [f"{b:.3f} -> {a:.3f}", fmt(*e["rl"][f"gain/{split}/{key}"]["mean_ci"])]
            rows.append(cells + [fmt(*e["rl"]["frac_reward_zero_std_first_quarter"]["mean_ci"], digits=2)])
        lines += markdown_table(["arm", "test pass@1", "gain", f"test pass@{k_eval}", "gain", "hard pass@1", "gain",
                                 "rollout groups with zero reward variance (first quarter of RL)"], rows)
    return lines + ["", "Mean ± half-width of the 95% t-interval over seeds.", ""]


def _selection_lines(track: Track, sel: dict | None) -> list[str]:
    if not sel:
        return []
    lines = [f"## AESL threshold sweep (seed {track.seeds[0]}, validation split only)", ""]
    lines += markdown_table(["tau_tok = tau_seq", "final val acc", "entropy", "self-BLEU", "chosen"],
                            ([f"{r['tau']:g}", f"{r['val/answer_accuracy']:.3f}", f"{r['val/gen_entropy']:.3f}", f"{r['val/self_bleu']:.3f}",
                              "yes" if r["tau"] == sel["chosen_tau"] else ""] for r in sel["sweep"]))
    return lines + [""]


def _sweep_lines(track: Track, sweep: list[dict], correlations: dict) -> list[str]:
    if not sweep:
        return []
    k_eval = track.eval_samples
    lines = [f"## Checkpoint sweep (CE seed {track.seeds[0]}, {track.sweep_grpo_steps} GRPO steps from each snapshot)", ""]
    lines += markdown_table(["SFT step", "SFT val acc", "SFT entropy", "SFT self-BLEU", "post-RL test pass@1", "post-RL greedy"],
                            ([s["step"], f"{s['sft_accuracy']:.3f}", f"{s['sft_entropy']:.3f}", f"{s['sft_self_bleu']:.3f}",
                              f"{s['rl_pass@1']:.3f}", f"{s['rl_greedy']:.3f}"] for s in sweep))
    posts = ("rl_pass@1", f"rl_pass@{k_eval}", "rl_greedy")
    for subset, table in correlations.items():
        lines += ["", f"Spearman rank correlation of the snapshot's SFT validation numbers with its post-RL test numbers, {subset}:", ""]
        lines += markdown_table(["SFT predictor", "post-RL pass@1", f"post-RL pass@{k_eval}", "post-RL greedy"],
                                ([name, *(f"{row[post]:+.2f}" for post in posts)] for name, row in table.items()))
    return lines + [""]


def results_markdown(track: Track, summary: dict, meta: dict) -> str:
    """results.md: the main table."""
    lines = _header(track, meta)
    if track.smoke_run:
        lines += [("**Smoke run**: every stage for a step or two on sets of a few problems, to check the pipeline end to end. "
                   "The numbers below are not results and say nothing about the methods."), ""]
    lines += _base_lines(track, summary["base"]) + _arm_tables(track, summary["arms"])
    lines += _selection_lines(track, summary["aesl_selection"]) + _sweep_lines(track, summary["sweep"], summary["correlations"])
    lines += [("Figures: `diversity_curve.png` (CE seed 0: entropy and self-BLEU against step, turning point marked, accuracy below), "
               "`sweep.png` (post-RL accuracy against SFT accuracy and SFT diversity)."), ""]
    return "\n".join(lines)


def ablation_markdown(track: Track, ablation: dict, meta: dict) -> str:
    """ablation.md: set size x difficulty, CE against AESL."""
    k = track.eval_samples
    taus = ", ".join(f"{t:g}" for t in ablation["taus"]) or "?"
    lines = [f"# Ablation: cold-start set size x difficulty ({track.name} track)", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Wall time: {sum(i['wall_minutes'] for i in meta['invocations']):.1f} min over {len(meta['invocations'])} invocation(s)  ",
             f"Seeds with results: {ablation['seeds_done']} ({ablation['finished']} of {ablation['planned']} planned cells finished)", "",
             ("Same SFT step budget for every set size; CE keeps its best-validation-accuracy snapshot, AESL its end of training "
              f"(tau_tok = tau_seq = {taus}, the main table's choice on its validation split); "
              "then the main table's GRPO budget and the test split of the same difficulty."), ""]
    rows = []
    for size, difficulty in ablation["cells"]:
        row = ablation["table"][f"{size}/{difficulty}"]
        ce, aesl = row["ce_best_acc"], row["aesl"]
        rows.append([size, difficulty, f"{len(ce['seeds'])} / {len(aesl['seeds'])}", f"{ce['sft_accuracy'][0]:.2f} / {aesl['sft_accuracy'][0]:.2f}",
                     f"{ce['sft_entropy'][0]:.3f} / {aesl['sft_entropy'][0]:.3f}", ", ".join(map(str, ce["sft_steps"])), fmt(*ce["pass@1"]),
                     fmt(*aesl["pass@1"]), fmt(*row["aesl_minus_ce_pass@1"]), fmt(*ce[f"pass@{k}"]), fmt(*aesl[f"pass@{k}"])])
    lines += markdown_table(["set size", "difficulty", "seeds", "SFT val acc CE / AESL", "SFT entropy CE / AESL", "CE snapshot step",
                             "post-RL pass@1 CE", "post-RL pass@1 AESL", "AESL - CE pass@1 (paired)", f"pass@{k} CE", f"pass@{k} AESL"], rows)
    lines += ["", ("Mean ± half-width of the 95% t-interval over seeds; the paired column differences the two methods seed by "
                   "seed (same cold-start set and GRPO seed). SFT columns: the validation row of the checkpoint RL starts from "
                   "(CE: its best-accuracy snapshot, at the steps listed; AESL: the end). Figure: `ablation.png`."), ""]
    return "\n".join(lines)
