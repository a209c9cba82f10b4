"""Peak memory and step time of one GRPO step on SmolLM2-135M: `GRPOModule` against TRL 1.16's `GRPOTrainer`.

Issue 13's setting: G = 8 completions per prompt, up to 128 new tokens, everything else as in
`bench_grpo_step.py` (SmolLM2-135M-Instruct in fp32 on CPU, the built-in arithmetic prompts, temperature 1,
beta 0.04, epsilon 0.2, loss_type grpo, mu 1, rewards math_accuracy + 0.1 x boxed_format, AdamW, max_grad_norm
1, dropout disabled on both sides; `--mode lora`: LoRA r 16 / alpha 32 on all linear layers, the reference is
the adapter-disabled model on both sides; `--mode full`: full fine-tuning with a frozen reference copy on both
sides), `--prompts` prompts per step.

Each side runs alone in a fresh subprocess (so neither inherits the other's allocations), loads the same
converted Hugging Face folder, and trains `--steps` steps. Memory is the resident set of that process:
- "training peak": the high-water mark of the resident set from the start of training (Linux `VmHWM`, reset
  through `/proc/self/clear_refs` when training begins: model loading and the reference copy are already in
  it, the loading's own transient peak is not) to its end;
- "process peak": `ru_maxrss` over the whole process, loading included.
Step time: the median over the steps after the first (`--drop-first`), timed like for like as in
`bench_grpo_step.py` (a callback span on both sides, the same prompts in the same order, each side's generated
tokens counted, so the ratio is also given per generated token). Sides alternate order over `--rounds`.

    python benchmarks/bench_grpo_memory.py --mode lora --steps 3
    python benchmarks/bench_grpo_memory.py --mode full --competing-load
    python benchmarks/bench_grpo_memory.py --mode lora --json out.json      # {"setting", "summary", "raw"}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile

import bench_grpo_step as step_bench  # benchmarks/ is on sys.path when run as a script
from _timing import competing_load


def reset_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def configure(opts) -> None:
    """Issue 13's sizes, set on the shared configuration of bench_grpo_step (its functions read these globals)."""
    step_bench.G, step_bench.MAX_NEW, step_bench.PROMPTS = opts.generations, opts.max_new_tokens, opts.prompts


def run_side(opts) -> dict:
    import lightning as L
    import torch

    configure(opts)
    torch.set_num_threads(opts.threads)
    marks: dict = {}
    if opts.side == "ours":
        class Reset(L.Callback):
            def on_train_start(self, trainer, pl_module):
                marks["reset"] = reset_peak()

        module, data = step_bench.build(opts.mode, opts.seed)
        records = step_bench.our_steps(module, data, opts.steps, callbacks=(Reset(),), precision=opts.precision)
    else:
        original = step_bench.HFStepTimer

        class TimerWithReset(original):  # TRL's trainer is built inside trl_steps: add the reset to its timer
            def on_train_begin(self, args, state, control, **kwargs):
                marks["reset"] = reset_peak()

        step_bench.HFStepTimer = TimerWithReset
        with tempfile.TemporaryDirectory() as tmp:
            records = step_bench.trl_steps(opts.mode, opts.steps, opts.seed, tmp)
    steps, tokens, prompts = ([r[k] for r in records] for k in ("wall", "tokens", "prompts"))
    return {"side": opts.side, "steps": steps, "tokens": tokens, "prompts": prompts, "training_peak_mib": vm_hwm_mib(),
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "reset": marks.get("reset", False)}


def spawn(side: str, opts) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--side", side, "--out", out.name, "--mode", opts.mode, "--steps", str(opts.steps),
               "--prompts", str(opts.prompts), "--generations", str(opts.generations), "--max-new-tokens",
               str(opts.max_new_tokens), "--seed", str(opts.seed), "--threads", str(opts.threads),
               "--precision", getattr(opts, "precision", "32-true")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{side} side failed:\n{proc.stderr[-4000:]}")
        return json.loads(open(out.name).read())


def add_step_options(parser: argparse.ArgumentParser, rounds: int, rounds_help: str) -> None:
    """The GRPO step's setting and the run's options, shared with bench_grpo_precision.py (which spawns this script's
    sides, so both must read the same setting the same way)."""
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--drop-first", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--competing-load", action="store_true", help="beside a torch matmul loop keeping one core busy")
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser, rounds=1, rounds_help="rounds; each runs both sides, in alternating order")
    parser.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)  # our side's Trainer precision (bench_grpo_precision.py)
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        step_bench.quiet_logs()
        if opts.side == "trl" and opts.precision != "32-true":
            raise SystemExit(f"--precision {opts.precision}: only our side takes a precision; TRL's runs in fp32 here")
        result = run_side(opts)
        with open(opts.out, "w") as f:
            json.dump(result, f)
        return
    import torch
    import transformers

    with competing_load(opts.competing_load) as loaded:
        print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"trl {__import__('trl').__version__}; {opts.threads} torch threads, {os.cpu_count()} cores; competing torch "
              f"process: {'yes' if loaded else 'no'}; load average at start {os.getloadavg()}")
        print(f"mode {opts.mode}: {opts.prompts} prompts x G={opts.generations}, max_new_tokens {opts.max_new_tokens}, "
              f"{opts.steps} steps per side (first {opts.drop_first} dropped), {opts.rounds} round(s)", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(opts.rounds):
            for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                runs[side].append(spawn(side, opts))
                last = runs[side][-1]
                print(f"  round {r} {side}: steps {[round(s, 1) for s in last['steps']]} s, tokens {last['tokens']}, "
                      f"training peak {last['training_peak_mib']:.0f} MiB (reset: {last['reset']}), process peak "
                      f"{last['process_peak_mib']:.0f} MiB", flush=True)
        summary = {}
        for side, results in runs.items():
            kept = [s for res in results for s in res["steps"][opts.drop_first:]]
            per_token = [s / n for res in results for s, n in zip(res["steps"][opts.drop_first:], res["tokens"][opts.drop_first:])]
            summary[side] = {"step": statistics.median(kept), "training_peak": max(r["training_peak_mib"] for r in results),
                             "process_peak": max(r["process_peak_mib"] for r in results),
                             "per_token": statistics.median(per_token),
                             "tokens": statistics.median(n for res in results for n in res["tokens"][opts.drop_first:])}
        o, t = summary["ours"], summary["trl"]
        mem, whole, step = o["training_peak"] / t["training_peak"], o["process_peak"] / t["process_peak"], o["step"] / t["step"]
        print(f"training peak memory: ours {o['training_peak']:.0f} MiB, TRL {t['training_peak']:.0f} MiB, ratio {mem:.3f} "
              f"(target <= 1.0: {'met' if mem <= 1.0 else 'MISSED'}); process peak ratio {whole:.3f}")
        print(f"step time: ours {o['step']:.1f} s, TRL {t['step']:.1f} s (medians), ratio {step:.3f} (target <= 1.0: "
              f"{'met' if step <= 1.0 else 'MISSED'})")
        same = [r["prompts"] for r in runs["ours"]] == [r["prompts"] for r in runs["trl"]]
        per_token = o["per_token"] / t["per_token"]
        print(f"per generated token: ratio {per_token:.3f} (median tokens per step: ours {o['tokens']:.0f}, TRL "
              f"{t['tokens']:.0f}); same prompts in the same order: {same}")
        print(f"load average at end {os.getloadavg()}")
    if opts.json:
        figures = {"training_peak_ratio": mem, "process_peak_ratio": whole, "step_over_trl": step,
                   "step_per_token_over_trl": per_token, "same_prompts_as_trl": float(same)}
        for side, values in summary.items():
            units = {"step": "step_s", "training_peak": "training_peak_mib", "process_peak": "process_peak_mib",
                     "per_token": "s_per_token", "tokens": "tokens_per_step"}
            figures.update({f"{side}_{units[k]}": v for k, v in values.items()})
        setting = {"model": step_bench.MODEL, "dtype": "fp32", "mode": opts.mode, "prompts": opts.prompts,
                   "G": opts.generations, "max_new_tokens": opts.max_new_tokens, "steps": opts.steps,
                   "drop_first": opts.drop_first, "rounds_in_script": opts.rounds, "threads": opts.threads,
                   "memory": "VmHWM from the start of training (reset via /proc/self/clear_refs); ru_maxrss of the process"}
        with open(opts.json, "w") as f:
            json.dump({"setting": setting, "summary": figures, "raw": runs}, f, indent=1)


if __name__ == "__main__":
    main()
