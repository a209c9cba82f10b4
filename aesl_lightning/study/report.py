"""What a study's report needs besides its own numbers: strict JSON written atomically, the machine it ran on, a
`meta.json` of the invocations (command, commit, machine, wall time), the mean and t-interval over seeds, and
markdown tables."""

from __future__ import annotations

import json
import math
import os
import platform
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aesl_lightning.study.units import git_commit, strict_json

# two-sided 95 % quantiles of Student's t by degrees of freedom; beyond 10 the normal 1.96 (the tables' rule)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` to `path` as strict JSON (NaN and infinities as null, keys sorted), atomically: a reader sees the
    old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(strict_json(obj), f, indent=indent, sort_keys=True, allow_nan=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`; a file that is not JSON is an error that names it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err


def machine_summary() -> str:
    """`<n> CPU cores (<model>), <GPU or 'no GPU'>, Python <version>, torch <version>`."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def record_invocation(path: str | os.PathLike, command: str, wall_seconds: float, ran: bool, settings: Mapping[str, Any] | None = None,
                      totals: Mapping[str, Any] | None = None, repo: str | os.PathLike | None = None) -> dict:
    """Add this invocation to the meta record at `path` and return the record.

    The record holds the command, commit, machine and `settings` (workers, threads, ...) of the invocation that
    made the runs, `totals` (recomputed every time), the wall time of this invocation and the list of invocations
    that ran something (`{"wall_minutes", "finished"}` each). An invocation that ran nothing (`ran=False`: a report
    rebuilt from the records) keeps the earlier command, commit, machine and settings and adds no invocation.
    """
    path = Path(path)
    previous = read_json(path) if path.is_file() else {"invocations": []}
    settings = dict(settings or {})
    invocation = [{"wall_minutes": wall_seconds / 60, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}] if ran else []
    meta = {"command": command, "machine": machine_summary(), "commit": git_commit(repo), "wall_minutes": wall_seconds / 60,
            **settings, **dict(totals or {}), "invocations": previous["invocations"] + invocation}
    if not ran and "command" in previous:  # the runs were made by the earlier command, at its commit, on its machine
        meta.update({k: previous[k] for k in ("command", "commit", "machine", *settings) if k in previous})
    write_json(path, meta)
    return meta


def mean_ci(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95 % t-interval over seeds, t_{0.975, n-1} * sd / sqrt(n) (sd with
    n - 1; `T975`); None and NaN are left out; one value: half-width 0; none: (NaN, NaN)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def format_mean_ci(mean: float, half: float, digits: int = 3) -> str:
    """`mean ± half` with `digits` decimals; `n/a` for a NaN mean."""
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row (cells as `str`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"markdown_table: a row of {len(row)} cells under {len(header)} columns: {list(row)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines
