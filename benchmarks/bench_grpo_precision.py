"""One GRPO step of `GRPOModule` on SmolLM2-135M in fp32 against bf16-mixed: step time, time per generated token and
peak memory, measured side by side in one run.

The setting is `bench_grpo_memory.py`'s (built-in arithmetic prompts, temperature 1, beta 0.04, epsilon 0.2,
loss_type grpo, mu 1, rewards math_accuracy + 0.1 x boxed_format, AdamW, dropout off; `--mode lora`: LoRA r 16 /
alpha 32 on all linear layers; `--mode full`: full fine-tuning with a frozen reference copy). Only the Trainer's
precision differs. Under `bf16-mixed`, Lightning autocasts the training step. Sampling, the log-prob passes and the
loss's forward then run in bf16, while the weights, the optimiser and the statistics stay fp32. Each precision runs in
its own fresh subprocess. The order alternates over `--rounds`. Memory is the resident set from the start of training
(`VmHWM`, reset when training begins). Step time is the median over the steps after the first, per step and per
generated token. The two precisions sample different tokens, so their completions, and with them their lengths,
differ.

    python benchmarks/bench_grpo_precision.py --mode lora --steps 3 --rounds 2
    python benchmarks/bench_grpo_precision.py --mode full --competing-load
    python benchmarks/bench_grpo_precision.py --mode lora --json out.json      # {"setting", "summary", "raw"}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics

import bench_grpo_memory as memory  # benchmarks/ is on sys.path when run as a script
from _timing import competing_load

PRECISIONS = ("32-true", "bf16-mixed")
KEY = {"32-true": "fp32", "bf16-mixed": "bf16_mixed"}


def summarise(runs: dict[str, list[dict]], drop_first: int) -> dict[str, float]:
    """The figures of the record: per precision the median step (s), time per generated token (s), tokens per step and
    the training / process peaks (MiB, the largest over rounds); bf16-mixed against fp32 as speed-ups (> 1: faster) and
    memory ratios (< 1: smaller)."""
    out: dict[str, float] = {}
    for precision, results in runs.items():
        k = KEY[precision]
        steps = [s for r in results for s in r["steps"][drop_first:]]
        per_token = [s / n for r in results for s, n in zip(r["steps"][drop_first:], r["tokens"][drop_first:]) if n]
        out[f"{k}_step_s"] = statistics.median(steps)
        out[f"{k}_s_per_token"] = statistics.median(per_token)
        out[f"{k}_tokens_per_step"] = statistics.median(n for r in results for n in r["tokens"][drop_first:])
        out[f"{k}_training_peak_mib"] = max(r["training_peak_mib"] for r in results)
        out[f"{k}_process_peak_mib"] = max(r["process_peak_mib"] for r in results)
    out["bf16_mixed_step_speedup"] = out["fp32_step_s"] / out["bf16_mixed_step_s"]
    out["bf16_mixed_per_token_speedup"] = out["fp32_s_per_token"] / out["bf16_mixed_s_per_token"]
    out["bf16_mixed_training_peak_ratio"] = out["bf16_mixed_training_peak_mib"] / out["fp32_training_peak_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    memory.add_step_options(parser, rounds=2, rounds_help="rounds; each runs both precisions, in alternating order")
    opts = parser.parse_args()
    if opts.steps <= opts.drop_first:
        raise SystemExit(f"--steps {opts.steps} must exceed --drop-first {opts.drop_first}: no step would be timed")
    import torch

    with competing_load(opts.competing_load) as loaded:
        print(f"python {platform.python_version()}, torch {torch.__version__}; {opts.threads} torch threads, {os.cpu_count()} cores; "
              f"competing torch process: {'yes' if loaded else 'no'}; load average at start {os.getloadavg()}")
        print(f"mode {opts.mode}: {opts.prompts} prompts x G={opts.generations}, max_new_tokens {opts.max_new_tokens}, "
              f"{opts.steps} steps per precision (first {opts.drop_first} dropped), {opts.rounds} round(s)", flush=True)
        runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
        for r in range(opts.rounds):
            for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                side = copy.copy(opts)
                side.precision = precision
                runs[precision].append(memory.spawn("ours", side))
                last = runs[precision][-1]
                print(f"  round {r} {precision}: steps {[round(s, 1) for s in last['steps']]} s, tokens {last['tokens']}, "
                      f"training peak {last['training_peak_mib']:.0f} MiB (reset: {last['reset']})", flush=True)
        summary = summarise(runs, opts.drop_first)
        print(f"load average at end {os.getloadavg()}")
    for key, value in summary.items():
        print(f"{key:>34}: {value:.4f}")
    if opts.json:
        setting = {"model": "smollm2-135m-instruct", "mode": opts.mode, "precisions": list(PRECISIONS), "prompts": opts.prompts,
                   "G": opts.generations, "max_new_tokens": opts.max_new_tokens, "steps": opts.steps, "drop_first": opts.drop_first,
                   "rounds_in_script": opts.rounds, "threads": opts.threads,
                   "memory": "VmHWM from the start of training (reset via /proc/self/clear_refs); ru_maxrss of the process"}
        with open(opts.json, "w") as f:
            json.dump({"setting": setting, "summary": summary, "raw": runs}, f, indent=1)


if __name__ == "__main__":
    main()
