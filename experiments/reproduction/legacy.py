"""Run records as they were before the study library: `<out>/runs/<run id with / as __>.json`, the bare result of a
run written atomically (non-strict JSON). experiments/track_real.py still keeps its records this way (imported
through experiments/reproduce.py); the reproduction's own records moved to `<out>/units/` (migrate_runs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    id: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class Paths:
    def __init__(self, out: Path, work: Path) -> None:
        self.out, self.work = out, work
        self.runs = out / "runs"
        self.data = work / "data"
        self.base = work / "base" / "hf_model"
        self.base_copy = out / "base_model"

    def result(self, run_id: str) -> Path:
        return self.runs / f"{run_id.replace('/', '__')}.json"

    def run_dir(self, run_id: str) -> Path:
        return self.work / run_id


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
