"""AESL loss vs F.cross_entropy: forward+backward time and peak memory, plus the chunked (hidden-state) path.

    python benchmarks/bench_losses.py                    # [8 x 512] tokens, vocab 49152, H 576, fp32
    python benchmarks/bench_losses.py --repeats 3 --batch 2 --json out.json   # {"setting", "summary", "raw"}
    python benchmarks/bench_losses.py --batch 1 --seq 2048 --vocab 151936 --load      # beside a busy torch process

Time: median over `--repeats` forward+backward calls after `--warmup` calls, all paths interleaved in one
process so they share the machine's state. Peak memory: each path runs once in a fresh subprocess;
peak = ru_maxrss (the kernel's high-water mark of resident memory) minus the resident memory measured right
after the inputs were created. glibc is told to serve every allocation above 64 KiB with mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and RSS follows torch's live
tensors. Every tensor counted is written in full, so untouched pages do not hide anything.

Labels: every position is a completion token and the logits are random (no token is confident), so the
AESL gates switch nothing off: the worst case for AESL, which skips gated-off tokens in the backward pass.
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aesl_lightning.ops.kernels as kernels  # noqa: E402
from aesl_lightning import LossConfig  # noqa: E402
from aesl_lightning.maths.losses import IGNORE_INDEX, chunked_sft_loss, sft_loss  # noqa: E402

PATHS = {
    "ce": "F.cross_entropy on logits",
    "aesl": "AESL sft_loss on logits",
    "aesl_serial": "AESL sft_loss on logits, chunks in order (set_cpu_workers(1))",
    "aesl_entropy": "AESL sft_loss on logits, return_entropy=True",
    "ce_linear": "hidden @ W.T then F.cross_entropy",
    "aesl_chunked": "AESL chunked_sft_loss(hidden, W)",
}


def make_inputs(path: str, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    if path in ("ce_linear", "aesl_chunked"):
        hidden = torch.randn(args.batch, args.seq, args.hidden, generator=gen).requires_grad_()
        weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).requires_grad_()
        return {"hidden": hidden, "weight": weight, "labels": labels}
    logits = torch.randn(args.batch, args.seq, args.vocab, generator=gen).requires_grad_()
    return {"logits": logits, "labels": labels}


def step(path: str, inputs: dict, args: argparse.Namespace) -> None:
    """One forward+backward; gradients are dropped afterwards so every call allocates the same."""
    labels = inputs["labels"]
    config = LossConfig(name="aesl", chunk_size=args.chunk_size)
    if path in ("ce", "ce_linear"):
        # HF's shift-the-labels trick, so the baseline does not copy the logits either.
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        logits = inputs["logits"] if path == "ce" else inputs["hidden"] @ inputs["weight"].t()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    elif path in ("aesl", "aesl_entropy", "aesl_serial"):
        kernels.set_cpu_workers(1 if path == "aesl_serial" else None)
        loss = sft_loss(inputs["logits"], labels, config, return_entropy=path == "aesl_entropy").loss
    else:
        loss = chunked_sft_loss(inputs["hidden"], inputs["weight"], labels, config).loss
    loss.backward()
    kernels.set_cpu_workers(None)
    del loss
    for tensor in inputs.values():
        if isinstance(tensor, torch.Tensor):
            tensor.grad = None


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory_child(path: str, args: argparse.Namespace) -> None:
    inputs = make_inputs(path, args)
    before = current_rss()
    step(path, inputs, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak - before}))


def measure_memory(path: str, args: argparse.Namespace) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-child", path] + [
        f"--{k}={v}" for k, v in (("batch", args.batch), ("seq", args.seq), ("vocab", args.vocab), ("hidden", args.hidden))
    ]
    if args.chunk_elems:
        cmd.append(f"--chunk-elems={args.chunk_elems}")
    if args.chunk_size:
        cmd.append(f"--chunk-size={args.chunk_size}")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def start_load() -> subprocess.Popen:
    """Another torch (OpenMP) process keeping one core busy: the load that exposes loops of tiny kernels."""
    return subprocess.Popen([sys.executable, "-c", LOAD])


def measure_time(paths: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per forward+backward for each path, one list entry per round; paths alternate within a round."""
    inputs = {path: make_inputs(path, args) for path in paths}
    times: dict[str, list[float]] = {path: [] for path in paths}
    for i in range(args.warmup + args.repeats):
        for path in paths:
            start = time.perf_counter()
            step(path, inputs[path], args)
            if i >= args.warmup:
                times[path].append(time.perf_counter() - start)
    return times


RATIOS = (("aesl", "ce"), ("aesl_serial", "ce"), ("aesl_entropy", "ce"), ("aesl_chunked", "ce_linear"))


def write_json(args: argparse.Namespace, paths: list[str], times: dict, memory: dict, full: int) -> None:
    """The machine-readable result for benchmarks/run.py: per path median / min ms and peak MiB; per ratio the
    median of per-round time ratios (back-to-back calls) and the peak-memory ratio; every round's seconds."""
    summary: dict[str, float] = {}
    for path in paths:
        summary.update({f"{path}_median_ms": statistics.median(times[path]) * 1e3, f"{path}_min_ms": min(times[path]) * 1e3,
                        f"{path}_peak_mib": memory[path] / 2**20})
    for num, den in RATIOS:
        if num in times and den in times:
            summary[f"{num}_over_{den}_time"] = statistics.median(a / b for a, b in zip(times[num], times[den]))
            summary[f"{num}_over_{den}_memory"] = memory[num] / memory[den]
    setting = {"tokens": f"[{args.batch} x {args.seq}]", "vocab": args.vocab, "hidden": args.hidden, "dtype": "fp32",
               "paths": paths, "warmup": args.warmup, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
               "chunk_elems": kernels.DEFAULT_CHUNK_ELEMS,
               "memory": "ru_maxrss minus RSS after the inputs, fresh subprocess per path, MALLOC_MMAP_THRESHOLD_=65536 "
                         "(freed tensors leave RSS; this also hides the CPU workers' malloc arenas, ~100 MiB)"}
    raw = {"seconds": times, "peak_bytes": memory, "full_logits_bytes": full}
    Path(args.json).write_text(json.dumps({"setting": setting, "summary": summary, "raw": raw}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576, help="hidden size for the chunked path (SmolLM2-135M: 576)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of the chunked path (default: automatic)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    parser.add_argument("--load", action="store_true", help="time beside another torch process that keeps a core busy")
    parser.add_argument("--chunk-elems", type=int, default=None, help="kernel chunk budget in elements (default: kernels.DEFAULT_CHUNK_ELEMS)")
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_elems:
        kernels.DEFAULT_CHUNK_ELEMS = args.chunk_elems
    if args.memory_child:
        measure_memory_child(args.memory_child, args)
        return

    paths = args.paths.split(",")
    tokens = args.batch * args.seq
    full = tokens * args.vocab * 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"[{args.batch} x {args.seq}] tokens, vocab {args.vocab}, fp32; one [tokens x vocab] fp32 tensor = {full / 2**20:.0f} MiB")
    print("memory: peak ru_maxrss minus RSS after creating inputs, one fresh subprocess per path (MALLOC_MMAP_THRESHOLD_=65536)")
    memory = {path: measure_memory(path, args) for path in paths}
    load = start_load() if args.load else None
    try:
        times = measure_time(paths, args)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    print(f"load average after timing: {os.getloadavg()[0]:.2f}; competing torch process: {'yes' if args.load else 'no'}")
    median = {path: statistics.median(values) for path, values in times.items()}
    fastest = {path: min(values) for path, values in times.items()}

    rows = []
    for path in paths:
        rows.append(
            f"| {path} | {PATHS[path]} | {median[path] * 1e3:.0f} | {fastest[path] * 1e3:.0f} | {memory[path] / 2**20:.0f} | {memory[path] / full:.2f} |"
        )
    ratios = []
    for num, den, target in (
        ("aesl", "ce", "time <= 1.10, memory <= 1.0"),
        ("aesl_serial", "ce", "none (the chunks in order, as before 2026-11-30)"),
        ("aesl", "aesl_serial", "none (what the CPU workers change)"),
        ("aesl_entropy", "ce", "none (entropy + accuracy included)"),
        ("aesl_chunked", "ce_linear", "memory well below 1"),
    ):
        if num in times and den in times:
            # Ratio within each round (the two calls ran back to back), then the median over rounds: robust to
            # load from other processes that comes and goes between rounds.
            paired = statistics.median(a / b for a, b in zip(times[num], times[den]))
            ratios.append(
                f"| {num} / {den} | {median[num] / median[den]:.2f} | {paired:.2f} | {fastest[num] / fastest[den]:.2f} | {memory[num] / memory[den]:.2f} | {target} |"
            )

    if args.json:
        write_json(args, paths, times, memory, full)
    table = "\n".join(
        [
            "| path | what | median fwd+bwd (ms) | min fwd+bwd (ms) | peak extra memory (MiB) | peak in [tokens x vocab] fp32 copies |",
            "|---|---|---|---|---|---|",
        ]
        + rows
        + ["", "| ratio | time (medians) | time (median of per-round ratios) | time (minima) | peak memory | target |", "|---|---|---|---|---|---|"]
        + ratios
    )
    print()
    print(table)


if __name__ == "__main__":
    main()
