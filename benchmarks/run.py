"""Rerun the headline benchmarks at the current commit and record each one: `benchmarks/records/<name>.json`.

    python benchmarks/run.py                          # every benchmark, 3 rounds, idle and loaded
    python benchmarks/run.py --quick                  # reduced sizes, 1-2 rounds: about half an hour idle
    python benchmarks/run.py --only self_bleu,losses --rounds 5
    python benchmarks/run.py --list                   # the benchmarks, their exact arguments and expected minutes
    python benchmarks/run.py --until 18:30            # only the benchmarks expected to finish by then (UTC); the rest later
    python benchmarks/run.py --report                 # only regenerate RESULTS.md from the records

Each benchmark script runs as its own subprocess with `--json OUT` (its machine-readable result: `setting`,
`summary` of scalar figures, `raw` numbers), once per round and condition: "idle" (nothing started beside it)
and "loaded" (beside `_timing.LOAD`, a torch matmul loop keeping one core busy, started by `competing_load`).
The conditions alternate their order from round to round (idle first in even rounds), so slow drifts of the
machine hit both. The load averages before and after every run are kept, so an "idle" round that was not idle
shows. After every run the record is rewritten (an interrupted run keeps what it measured), and at the end
RESULTS.md is regenerated from all records (`report.py`) unless `--no-report`.

A full run takes hours on a 2-core machine, so it can be spread over sittings: each benchmark's record is its own
file, and `--until` starts no benchmark whose expected time would end after the deadline (it goes on with the ones
that fit, and names those left). A benchmark's expected time is the median seconds of its rounds in its latest
record of the same size (idle and loaded apart), else the table's planned minutes (an idle run; a loaded one is
planned at LOADED_SLOWDOWN times that).

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
import statistics
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
    and the rounds of a `--quick` run (the slow model-level comparisons take one: an idle and a loaded run) and of a
    full one. `minutes`: the planned (full, quick) minutes of one idle run, used for `--until` only until a record
    of that size has measured it. The script must accept `--json OUT` and write `{"setting", "summary", "raw"}` there."""

    name: str
    title: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None
    quick_rounds: int = 2
    full_rounds: int = 3
    minutes: tuple[float, float] = (5.0, 1.0)


BENCHMARKS = [
    Benchmark("losses", "SFT loss (AESL) vs F.cross_entropy: forward + backward time and peak memory",
              "bench_losses.py", ("--repeats", "7", "--warmup", "2"),
              ("--batch", "2", "--seq", "512", "--repeats", "3", "--warmup", "1", "--paths", "ce,aesl,ce_linear,aesl_chunked"),
              minutes=(3.0, 0.5)),
    Benchmark("sft_vs_trl", "SFT step: SFTModule under Lightning vs TRL SFTTrainer (SmolLM2-135M)",
              "bench_sft_vs_trl.py", ("--steps", "6", "--batch", "8"), ("--steps", "2", "--batch", "4"), 1, minutes=(4.0, 0.7)),
    # The step's parts and the step against bare generation of its tokens; the comparison with TRL's step is
    # grpo_memory_* (the same prompts in the same order, each side's tokens counted, G = 8, 128 tokens).
    Benchmark("grpo_step_lora", "GRPO step, LoRA: parts and the step vs bare generation of its tokens (SmolLM2-135M)",
              "bench_grpo_step.py", ("--mode", "lora", "--steps", "4", "--rounds", "2", "--no-trl"),
              ("--mode", "lora", "--steps", "2", "--rounds", "1", "--prompts", "2", "--max-new-tokens", "32"), 1,
              full_rounds=2, minutes=(8.0, 1.5)),
    Benchmark("grpo_step_full", "GRPO step, full fine-tuning: parts and the step vs bare generation of its tokens (SmolLM2-135M)",
              "bench_grpo_step.py", ("--mode", "full", "--steps", "4", "--rounds", "2", "--no-trl"),
              ("--mode", "full", "--steps", "2", "--rounds", "1", "--prompts", "2", "--max-new-tokens", "32"), 1,
              full_rounds=2, minutes=(8.0, 1.6)),
    Benchmark("grpo_memory_lora", "GRPO step vs TRL GRPOTrainer, LoRA, G = 8, 128 tokens: time, per generated token, peak memory (SmolLM2-135M)",
              "bench_grpo_memory.py", ("--mode", "lora", "--steps", "3"),
              ("--mode", "lora", "--steps", "2", "--prompts", "2", "--generations", "4", "--max-new-tokens", "32"), 1,
              full_rounds=2, minutes=(10.0, 1.0)),
    Benchmark("grpo_memory_full", "GRPO step vs TRL GRPOTrainer, full, G = 8, 128 tokens: time, per generated token, peak memory (SmolLM2-135M)",
              "bench_grpo_memory.py", ("--mode", "full", "--steps", "3"), None, full_rounds=2, minutes=(10.0, 1.0)),
    Benchmark("grpo_tiny_vs_trl", "GRPO step on the tiny built-in model vs TRL GRPOTrainer (framework overhead)",
              "bench_grpo_vs_trl.py", ("--steps", "6", "--rounds", "2"), ("--steps", "3", "--rounds", "1"), 1, minutes=(0.5, 0.2)),
    Benchmark("self_bleu", "Self-BLEU: vectorised self_bleu_batch vs the NLTK loop", "bench_self_bleu.py", (),
              ("--prompts", "16", "--repeats", "3", "--nltk-repeats", "1"), minutes=(1.0, 0.2)),
    Benchmark("reward_fuzz", "Reward fuzz: hostile completions through math_accuracy", "bench_reward_fuzz.py",
              ("--num", "10000"), ("--num", "2200"), minutes=(0.5, 0.2)),
    Benchmark("precision", "fp32 vs bf16 (autocast and weights): SFT step, sampling, matmul peak (SmolLM2-135M)",
              "bench_precision.py", (), ("--quick",), 1, full_rounds=2, minutes=(5.0, 0.7)),
    Benchmark("grpo_precision_lora", "GRPO step, LoRA, fp32 vs bf16-mixed: time per generated token, peak memory (SmolLM2-135M)",
              "bench_grpo_precision.py", ("--mode", "lora", "--steps", "3", "--rounds", "2"),
              ("--mode", "lora", "--steps", "2", "--rounds", "1", "--prompts", "2", "--generations", "4", "--max-new-tokens", "32"), 1,
              full_rounds=1, minutes=(16.0, 1.5)),
    Benchmark("grpo_precision_full", "GRPO step, full fine-tuning, fp32 vs bf16-mixed: time per generated token, peak memory (SmolLM2-135M)",
              "bench_grpo_precision.py", ("--mode", "full", "--steps", "3", "--rounds", "2"),
              ("--mode", "full", "--steps", "2", "--rounds", "1", "--prompts", "2", "--generations", "4", "--max-new-tokens", "32"), 1,
              full_rounds=1, minutes=(16.0, 1.5)),
]
LOADED_SLOWDOWN = 1.8  # planned: a model-level run beside the busy core took 1.5-2.1x its idle time (RESULTS-history.md)
BY_NAME = {b.name: b for b in BENCHMARKS}


def script_argv(bench: Benchmark, quick: bool, json_out: str) -> list[str]:
    """The exact command of one run of `bench`'s script (run from the repository root), writing its JSON result
    to `json_out`."""
    args = bench.quick if quick and bench.quick is not None else bench.full
    return [sys.executable, str(Path("benchmarks") / bench.script), *args, "--json", json_out]


def planned_rounds(bench: Benchmark, opts) -> int:
    return opts.rounds or (bench.quick_rounds if _sized(bench, opts) else bench.full_rounds)


def _sized(bench: Benchmark, opts) -> bool:
    """Whether this run of `bench` is at `--quick` size (a benchmark left out of --quick runs at full size)."""
    return bool(opts.quick) and bench.quick is not None


def read_record(bench: Benchmark, directory: Path) -> dict | None:
    path = directory / f"{bench.name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: unreadable record ({err}); move it aside to rerun {bench.name}") from err


def expected_seconds(bench: Benchmark, opts, record: dict | None) -> float:
    """Seconds this run of `bench` is expected to take: per condition, the median seconds of the successful rounds
    of that condition in its record of the same size, else the planned minutes (loaded: LOADED_SLOWDOWN x idle)."""
    quick = _sized(bench, opts)
    planned = bench.minutes[1 if quick else 0] * 60
    measured: dict[str, float] = {}
    if record is not None and bool(record.get("quick")) == quick:
        for condition in ("idle", "loaded"):
            seconds = [r["seconds"] for r in record.get("rounds", []) if r["condition"] == condition and r.get("returncode") == 0]
            if seconds:
                measured[condition] = statistics.median(seconds)
    per = {"idle": measured.get("idle", measured["loaded"] / LOADED_SLOWDOWN if "loaded" in measured else planned)}
    per["loaded"] = measured.get("loaded", per["idle"] * LOADED_SLOWDOWN)
    return planned_rounds(bench, opts) * sum(per[c] for c in opts.conditions)


def _without_json(argv: list[str]) -> list[str]:
    i = argv.index("--json") if "--json" in argv else len(argv)
    return argv[:i] + argv[i + 2:]


def is_complete(bench: Benchmark, opts, record: dict | None) -> bool:
    """Whether `record` already holds this run: the same size and conditions, every planned round of every condition
    finished without error, each with exactly the arguments this run would pass (the commit may differ: it is
    recorded)."""
    if record is None or bool(record.get("quick")) != _sized(bench, opts) or record.get("conditions") != opts.conditions:
        return False
    want = [shlex.quote(a) for a in _without_json(script_argv(bench, opts.quick, "OUT"))[1:]]
    done = [r for r in record.get("rounds", []) if r.get("returncode") == 0 and "result" in r
            and _without_json(r["argv"])[1:] == want]
    return all(sum(r["condition"] == c for r in done) >= planned_rounds(bench, opts) for c in opts.conditions)


def schedule(names: list[str], opts, now: float, deadline: float | None, log=print) -> list[str]:
    """The benchmarks to run now, in order: with `opts.resume`, not those whose record already holds this run; with a
    deadline, only those whose expected time fits, in turn (a long one left over does not stop shorter ones after it)."""
    chosen, clock = [], now
    for name in names:
        bench = BY_NAME[name]
        record = read_record(bench, opts.records)
        if opts.resume and is_complete(bench, opts, record):
            log(f"[{name}] already recorded ({record['finished']}, commit {record['commit'][:7]}): skipped (--resume)")
            continue
        seconds = expected_seconds(bench, opts, record)
        if deadline is not None and clock + seconds > deadline:
            log(f"[{name}] left for a later sitting: expected {seconds / 60:.0f} min, "
                f"{max(0.0, deadline - clock) / 60:.0f} min left before the deadline")
            continue
        chosen.append(name)
        clock += seconds
    return chosen


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
    record = new_record(bench, _sized(bench, opts), opts.conditions, command)
    rounds = planned_rounds(bench, opts)
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
                        help="rounds per condition (default: the benchmark's own, see --list; --quick: 2, or 1 for the "
                             "model-level comparisons)")
    parser.add_argument("--conditions", default="idle,loaded", help="idle, loaded or both (comma-separated)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one run is stopped")
    parser.add_argument("--records", type=Path, default=_records.RECORDS, help="folder of the JSON records")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the report to regenerate")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md at the end")
    parser.add_argument("--report", action="store_true", help="only regenerate RESULTS.md from the records")
    parser.add_argument("--list", action="store_true", help="print the benchmarks, their arguments and expected minutes, then exit")
    parser.add_argument("--until", default=None,
                        help="start no benchmark expected to end after this time (HH:MM UTC or ISO); the rest wait for a later sitting")
    parser.add_argument("--resume", action="store_true",
                        help="skip the benchmarks whose record already holds this run (same size, arguments and conditions, every round done)")
    opts = parser.parse_args(argv)
    import report

    if opts.report:
        print(report.write_report(opts.records, opts.results))
        return
    names = [n for n in opts.only.split(",") if n] or [b.name for b in BENCHMARKS if not opts.quick or b.quick is not None]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(BY_NAME)}")
    opts.conditions = [c for c in opts.conditions.split(",") if c]
    if not opts.conditions or set(opts.conditions) - {"idle", "loaded"}:
        parser.error(f"--conditions: expected idle and/or loaded, got {opts.conditions}")
    if opts.list:
        total = 0.0
        for b in BENCHMARKS:
            quick = "(left out)" if b.quick is None else f"{b.script} {' '.join(b.quick)}"
            minutes = expected_seconds(b, opts, read_record(b, opts.records)) / 60
            total += minutes if b.name in names else 0.0
            print(f"{b.name:>19}: {b.script} {' '.join(b.full)}  [{b.full_rounds} round(s)]\n{'--quick':>19}: {quick}  "
                  f"[{b.quick_rounds} round(s)]\n{'this run':>19}: ~{minutes:.0f} min ({'quick' if _sized(b, opts) else 'full'}, "
                  f"{', '.join(opts.conditions)})")
        print(f"expected in all (the benchmarks selected): ~{total:.0f} min")
        return
    from aesl_lightning.study.schedule import parse_until

    names = schedule(names, opts, time.time(), parse_until(opts.until))
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    for name in names:
        run_benchmark(BY_NAME[name], opts, command.strip())
    if not opts.no_report:
        print(report.write_report(opts.records, opts.results))


if __name__ == "__main__":
    main()
