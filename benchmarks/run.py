"""Rerun the headline benchmarks at the current commit and record each one: `benchmarks/records/<name>.json`.

    python benchmarks/run.py                          # every benchmark, 3 rounds, idle and loaded
    python benchmarks/run.py --quick                  # reduced sizes, 1-2 rounds: about half an hour idle
    python benchmarks/run.py --only self_bleu,losses --rounds 5
    python benchmarks/run.py --list                   # the benchmarks and their exact arguments
    python benchmarks/run.py --report                 # only regenerate RESULTS.md from the records

Each benchmark script runs as its own subprocess with `--json OUT` (its machine-readable result: `setting`,
`summary` of scalar figures, `raw` numbers), once per round and condition: "idle" (nothing started beside it)
and "loaded" (beside `_timing.LOAD`, a torch matmul loop keeping one core busy, started by `competing_load`).
The conditions alternate their order from round to round (idle first in even rounds), so slow drifts of the
machine hit both. The load averages before and after every run are kept, so an "idle" round that was not idle
shows. After every run the record is rewritten (an interrupted run keeps what it measured), and at the end
RESULTS.md is regenerated from all records (`report.py`) unless `--no-report`.

`--quick` runs fewer rounds, steps and smaller shapes; its records say `"quick": true` and the report marks
them as such: they show that the harness and the scripts work, not the headline figures.
TRL-based benchmarks need `pip install --no-deps trl==1.16.0` (a benchmark-only dependency, never imported by
the package); without it their rounds fail and the record says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _records  # noqa: E402


@dataclass(frozen=True)
class Benchmark:
    """One headline benchmark: its script (a file name in benchmarks/, or an absolute path), the arguments of a
    full and of a `--quick` run (None: left out of `--quick` unless named in `--only`, then run at full size),
    and the rounds of a `--quick` run (the slow model-level comparisons take one: an idle and a loaded run).
    The script must accept `--json OUT` and write `{"setting", "summary", "raw"}` there."""

    name: str
    title: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None
    quick_rounds: int = 2


BENCHMARKS = [
    Benchmark("losses", "SFT loss (AESL) vs F.cross_entropy: forward + backward time and peak memory",
              "bench_losses.py", ("--repeats", "7", "--warmup", "2"),
              ("--batch", "2", "--seq", "512", "--repeats", "3", "--warmup", "1", "--paths", "ce,aesl,ce_linear,aesl_chunked")),
    Benchmark("sft_vs_trl", "SFT step: SFTModule under Lightning vs TRL SFTTrainer (SmolLM2-135M)",
              "bench_sft_vs_trl.py", ("--steps", "6", "--batch", "8"), ("--steps", "2", "--batch", "4"), 1),
    Benchmark("grpo_step_lora", "GRPO step, LoRA: parts, vs bare generation and vs TRL GRPOTrainer (SmolLM2-135M)",
              "bench_grpo_step.py", ("--mode", "lora", "--steps", "5", "--rounds", "3"),
              ("--mode", "lora", "--steps", "2", "--rounds", "1", "--prompts", "2", "--max-new-tokens", "32"), 1),
    Benchmark("grpo_step_full", "GRPO step, full fine-tuning: parts, vs bare generation and vs TRL (SmolLM2-135M)",
              "bench_grpo_step.py", ("--mode", "full", "--steps", "5", "--rounds", "3"),
              ("--mode", "full", "--steps", "2", "--rounds", "1", "--prompts", "2", "--max-new-tokens", "32"), 1),
    Benchmark("grpo_memory_lora", "GRPO step peak memory and time vs TRL, LoRA, G = 8, 128 tokens (SmolLM2-135M)",
              "bench_grpo_memory.py", ("--mode", "lora", "--steps", "3"),
              ("--mode", "lora", "--steps", "2", "--prompts", "2", "--generations", "4", "--max-new-tokens", "32"), 1),
    Benchmark("grpo_memory_full", "GRPO step peak memory and time vs TRL, full, G = 8, 128 tokens (SmolLM2-135M)",
              "bench_grpo_memory.py", ("--mode", "full", "--steps", "3"), None),
    Benchmark("grpo_tiny_vs_trl", "GRPO step on the tiny built-in model vs TRL GRPOTrainer (framework overhead)",
              "bench_grpo_vs_trl.py", ("--steps", "6", "--rounds", "2"), ("--steps", "3", "--rounds", "1"), 1),
    Benchmark("self_bleu", "Self-BLEU: vectorised self_bleu_batch vs the NLTK loop", "bench_self_bleu.py", (),
              ("--prompts", "16", "--repeats", "3", "--nltk-repeats", "1")),
    Benchmark("reward_fuzz", "Reward fuzz: hostile completions through math_accuracy", "bench_reward_fuzz.py",
              ("--num", "10000"), ("--num", "2200")),
    Benchmark("precision", "fp32 vs bf16 (autocast and weights): SFT step, sampling, matmul peak (SmolLM2-135M)",
              "bench_precision.py", (), ("--quick",), 1),
    Benchmark("grpo_precision_lora", "GRPO step, LoRA, fp32 vs bf16-mixed: time per generated token, peak memory (SmolLM2-135M)",
              "bench_grpo_precision.py", ("--mode", "lora", "--steps", "3", "--rounds", "2"),
              ("--mode", "lora", "--steps", "2", "--rounds", "1", "--prompts", "2", "--generations", "4", "--max-new-tokens", "32"), 1),
    Benchmark("grpo_precision_full", "GRPO step, full fine-tuning, fp32 vs bf16-mixed: time per generated token, peak memory (SmolLM2-135M)",
              "bench_grpo_precision.py", ("--mode", "full", "--steps", "3", "--rounds", "2"),
              ("--mode", "full", "--steps", "2", "--rounds", "1", "--prompts", "2", "--generations", "4", "--max-new-tokens", "32"), 1),
]
BY_NAME = {b.name: b for b in BENCHMARKS}


def script_argv(bench: Benchmark, quick: bool, json_out: str) -> list[str]:
    """The exact command of one run of `bench`'s script (run from the repository root), writing its JSON result
    to `json_out`."""
    args = bench.quick if quick and bench.quick is not None else bench.full
    return [sys.executable, str(Path("benchmarks") / bench.script), *args, "--json", json_out]


def run_once(bench: Benchmark, quick: bool, condition: str, index: int, timeout: float | None) -> dict:
    """One run of the script in `condition` ("idle" or "loaded"); the round's entry of the record."""
    if condition == "loaded":
        from _timing import competing_load  # imports lightning: only where the load is needed
    else:
        competing_load = lambda enabled: contextlib.nullcontext()  # noqa: E731

    with tempfile.TemporaryDirectory(prefix=f"bench-{bench.name}-") as tmp:
        out = os.path.join(tmp, "result.json")
        argv = script_argv(bench, quick, out)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_records.ROOT), os.environ.get("PYTHONPATH")])))
        with competing_load(condition == "loaded"):
            load_before, start = _records.load_average(), time.perf_counter()
            try:
                proc = subprocess.run(argv, cwd=_records.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
                returncode, stderr = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as err:
                returncode, stderr = "timeout", (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
            seconds, load_after = time.perf_counter() - start, _records.load_average()
        entry = {"round": index, "condition": condition, "argv": [shlex.quote(a) for a in argv], "load_before": load_before,
                 "load_after": load_after, "seconds": round(seconds, 2), "returncode": returncode}
        if os.path.exists(out):
            with open(out) as f:
                entry["result"] = json.load(f)
        if returncode != 0 or "result" not in entry:
            entry["error"] = stderr[-3000:]
    return entry


def new_record(bench: Benchmark, quick: bool, conditions: list[str], command: str) -> dict:
    commit, dirty = _records.git_state()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"schema": _records.SCHEMA, "name": bench.name, "title": bench.title, "script": f"benchmarks/{bench.script}",
            "quick": quick, "commit": commit, "dirty": dirty, "started": now, "finished": None, "command": command,
            "versions": _records.versions(), "machine": _records.machine(), "setting": {}, "conditions": conditions,
            "rounds": [], "summary": {}}


def write(record: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def run_benchmark(bench: Benchmark, opts, command: str) -> dict:
    """All rounds of one benchmark, conditions interleaved; the record is rewritten after every run."""
    record = new_record(bench, opts.quick and bench.quick is not None, opts.conditions, command)
    rounds = opts.rounds or (bench.quick_rounds if opts.quick else 3)
    for r in range(rounds):
        for condition in opts.conditions if r % 2 == 0 else opts.conditions[::-1]:
            entry = run_once(bench, opts.quick, condition, r, opts.timeout)
            record["rounds"].append(entry)
            if "result" in entry and not record["setting"]:
                record["setting"] = entry["result"].get("setting", {})
            record["summary"] = _records.summarise(record["rounds"])
            record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            path = write(record, opts.records)
            status = "ok" if entry["returncode"] == 0 else f"exit {entry['returncode']}"
            print(f"[{bench.name}] round {r + 1}/{rounds} {condition}: {status}, {entry['seconds']:.0f} s, load "
                  f"{entry['load_before'][0]} -> {entry['load_after'][0]} -> {path}", flush=True)
            if "error" in entry:
                print("   " + entry["error"].strip().splitlines()[-1] if entry["error"].strip() else "   (no stderr)", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes and 2 rounds; records marked quick")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all; see --list)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per condition (default 3; --quick: 2, or 1 for the model-level comparisons)")
    parser.add_argument("--conditions", default="idle,loaded", help="idle, loaded or both (comma-separated)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one run is stopped")
    parser.add_argument("--records", type=Path, default=_records.RECORDS, help="folder of the JSON records")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the report to regenerate")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md at the end")
    parser.add_argument("--report", action="store_true", help="only regenerate RESULTS.md from the records")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their arguments, then exit")
    opts = parser.parse_args(argv)
    import report

    if opts.report:
        print(report.write_report(opts.records, opts.results))
        return
    if opts.list:
        for b in BENCHMARKS:
            quick = "(left out)" if b.quick is None else f"{b.script} {' '.join(b.quick)}"
            print(f"{b.name:>18}: {b.script} {' '.join(b.full)}\n{'--quick':>18}: {quick}")
        return
    names = [n for n in opts.only.split(",") if n] or [b.name for b in BENCHMARKS if not opts.quick or b.quick is not None]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(BY_NAME)}")
    opts.conditions = [c for c in opts.conditions.split(",") if c]
    if not opts.conditions or set(opts.conditions) - {"idle", "loaded"}:
        parser.error(f"--conditions: expected idle and/or loaded, got {opts.conditions}")
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    for name in names:
        run_benchmark(BY_NAME[name], opts, command.strip())
    if not opts.no_report:
        print(report.write_report(opts.records, opts.results))


if __name__ == "__main__":
    main()
