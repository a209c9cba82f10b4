"""The benchmark records: where a figure came from (commit, versions, machine, load) and how it spread over rounds.

One JSON record per benchmark lives at `benchmarks/records/<name>.json`. `run.py` writes them, `report.py`
turns them into RESULTS.md, and nothing else is needed to rebuild the report. A record holds:

- `name`, `title`, `script`, `quick` (True: the reduced `--quick` sizes, not a headline figure), `schema`;
- `commit` (full hash), `dirty` (uncommitted changes to tracked files when it ran), `started` / `finished`
  (UTC, ISO 8601), `command` (the `run.py` command line), `versions` (python, torch, transformers, lightning,
  trl; None when not installed), `machine` (cpu model, logical cores, memory in GiB, platform);
- `setting` (what the script says it measured: shapes, tokens, G, ...), `conditions` (["idle", "loaded"]);
- `rounds`: one entry per run of the script, in the order they ran: `round`, `condition`, `argv` (the exact
  script command), `load_before` / `load_after` (the 1/5/15-minute load averages), `seconds`, `returncode`,
  `result` (the script's own JSON: `setting`, `summary`, `raw`) or `error` (the tail of its stderr);
- `summary`: for each condition and each figure in the scripts' `summary`, `median`, `min`, `max`,
  `ci95` (bootstrap percentile interval of the median over rounds; None with fewer than 3 rounds), `n`, `values`.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SCHEMA = 1
ROOT = Path(__file__).resolve().parents[1]
RECORDS = Path(__file__).resolve().with_name("records")
REQUIRED = ("schema", "name", "title", "script", "quick", "commit", "dirty", "started", "finished", "command",
            "versions", "machine", "setting", "conditions", "rounds", "summary")
ROUND_REQUIRED = ("round", "condition", "argv", "load_before", "load_after", "seconds", "returncode")
PACKAGES = ("torch", "transformers", "lightning", "trl")


def git_state(root: Path = ROOT) -> tuple[str, bool]:
    """(commit hash, whether tracked files differ from it); ("unknown", True) outside a git checkout. The records
    and RESULTS.md themselves do not count: a run rewrites them as it goes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/records", ":(exclude)benchmarks/RESULTS.md"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())


def versions() -> dict[str, str | None]:
    """Installed versions of python and of the packages the benchmarks compare; None for one not installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """CPU model (from /proc/cpuinfo where there is one), logical cores, total memory in GiB, platform."""
    from aesl_lightning.study.units import cpu_info

    info = cpu_info()
    cpu = info["model"] or platform.processor() or platform.machine()
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in info["flags"]]
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": None if memory is None else round(memory, 1),
            "cpu_flags": flags, "platform": f"{platform.system()} {platform.release()} {platform.machine()}"}


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def bootstrap_median_ci(values: list[float], level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the median: medians of `resamples` resamples with replacement, cut at
    (1 - level) / 2 and (1 + level) / 2. None with fewer than 3 values (too few rounds for an interval)."""
    if len(values) < 3:
        return None
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    low = medians[int((1 - level) / 2 * (resamples - 1))]
    high = medians[int((1 + level) / 2 * (resamples - 1))]
    return [low, high]


def summarise(rounds: list[dict]) -> dict[str, dict[str, dict]]:
    """For each condition, each figure of the rounds' `result.summary`: median, min, max, ci95, n, values
    (rounds in the order they ran; failed rounds and non-numeric figures are left out)."""
    out: dict[str, dict[str, dict]] = {}
    for entry in rounds:
        result = entry.get("result")
        if not result:
            continue
        for key, value in result.get("summary", {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                continue
            out.setdefault(entry["condition"], {}).setdefault(key, {"values": []})["values"].append(float(value))
    for figures in out.values():
        for stats in figures.values():
            values = stats["values"]
            stats.update(median=statistics.median(values), min=min(values), max=max(values), n=len(values),
                         ci95=bootstrap_median_ci(values))
    return out


def missing_fields(record: dict) -> list[str]:
    """The required fields a record lacks (its own and each round's, as `rounds[i].field`); [] when complete."""
    missing = [key for key in REQUIRED if key not in record]
    for i, entry in enumerate(record.get("rounds", [])):
        missing += [f"rounds[{i}].{key}" for key in ROUND_REQUIRED if key not in entry]
        if "result" not in entry and "error" not in entry:
            missing.append(f"rounds[{i}].result or error")
    return missing
