"""JSONL files of records: one JSON object per line, written atomically (standard library only)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["read_jsonl", "write_jsonl"]


def write_jsonl(records: Iterable[Mapping], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically: a reader sees the old file or the complete new one.

    The file gets the mode a plain `open(path, "w")` would give it (0o666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file lives in the same folder so that os.replace is a rename on one filesystem; it is
    # created with os.open's 0o666 (the umask applies), not mkstemp's private 0o600.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file written by `write_jsonl` (use `formats.load_records` for validated input)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
