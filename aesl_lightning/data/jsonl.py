"""JSONL files of records: one JSON object per line, written atomically; and the strict, bounded reading of
untrusted JSON that the data formats use (standard library only).

Strict reading (`strict_json`, `capped_lines`): no `NaN`, `Infinity` or numbers that overflow to them
(`1e400`), no key twice in one object, no line longer than `max_record_chars()` characters (read with that
cap, never whole), and a line number for invalid UTF-8 (`invalid_utf8_line`).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_RECORD_CHARS", "capped_lines", "invalid_utf8_line", "max_record_chars", "read_jsonl", "strict_json", "write_jsonl"]

MAX_RECORD_CHARS = 1_000_000
RECORD_CHARS_ENV = "AESL_MAX_RECORD_CHARS"


def max_record_chars() -> int:
    """The longest record read, in characters: `$AESL_MAX_RECORD_CHARS` if set, else `MAX_RECORD_CHARS`
    (1,000,000: a record beyond it would only be dropped as longer than any max_length after a slow tokenisation)."""
    value = os.environ.get(RECORD_CHARS_ENV, "")
    try:
        return int(value) if value else MAX_RECORD_CHARS
    except ValueError:
        raise ValueError(f"{RECORD_CHARS_ENV}: expected a whole number of characters, found {value!r}") from None


class StrictJSONError(ValueError):
    """A JSON text that parses but is refused (non-finite number, duplicate key); the message says what."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise StrictJSONError(f"key {key!r} appears twice in one object (JSON readers silently keep the last)")
        record[key] = value
    return record


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:40]} overflows to {value}")
    return value


def _no_constant(name: str) -> float:
    raise StrictJSONError(f"{name} is not a JSON number (expected a finite number or a string)")


def strict_json(text: str) -> Any:
    """`json.loads` refusing NaN / Infinity / overflowing numbers and duplicate keys (`StrictJSONError`).
    `json.JSONDecodeError` for malformed text, `RecursionError` for nesting deeper than the reader's stack."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite, parse_constant=_no_constant)


def capped_lines(path: Path, limit: int) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of every line of a UTF-8 file, the text `None` for a line longer than `limit`
    characters (reading stops there). Reads at most `limit + 1` characters per line; `UnicodeDecodeError`
    propagates (`invalid_utf8_line` says where)."""
    with path.open(encoding="utf-8", newline="") as f:
        number = 0
        while True:
            line = f.readline(limit + 2)  # + the line break, which is no part of the record
            if not line:
                return
            number += 1
            record = line.rstrip("\r\n")
            if len(record) > limit:
                yield number, None
                return
            yield number, record


def invalid_utf8_line(path: Path, chunk_bytes: int = 1 << 20) -> tuple[int, int] | None:
    """(line, byte offset in the file) of the first byte sequence in `path` that is not UTF-8, or None.
    Reads the file in chunks; never holds more than one chunk."""
    newlines = offset = 0
    pending = b""
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            data = pending + chunk
            try:
                data.decode("utf-8")
                pending = b""
            except UnicodeDecodeError as error:
                truncated = error.reason == "unexpected end of data" and chunk and error.start >= len(data) - 3
                if not truncated:  # the bytes at error.start are invalid (or the file ends inside a character)
                    return newlines + data.count(b"\n", 0, error.start) + 1, offset + error.start
                pending = data[error.start :]
                data = data[: error.start]
            if not chunk:
                return None
            newlines += data.count(b"\n")
            offset += len(data)


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
