"""The folder of an export: what may be replaced, the atomic write beside it, and the leftovers of killed exports.

Every export holds a marker, `aesl_export.json`, naming the toolkit and listing every entry the export wrote with
its size (and sha256 for files up to `HASHED_BYTES`); a later export replaces the folder only while it holds exactly
that (files deleted from it are fine), so files, folders or symbolic links a user added, and files a user edited
(a config.json), are never replaced without `overwrite=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aesl_lightning import __version__

EXPORT_INFO_FILE = "aesl_export.json"
"""Small JSON written into every export: its format ("full" or "peft-adapter"), dtype and toolkit version."""

HASHED_BYTES = 64 * 2**20
"""Files up to this size are recorded with their sha256 in the marker (configs, tokenizer); larger ones (the
weights) with their size only, so that checking a folder stays fast."""

log = logging.getLogger("aesl_lightning")


class ExportTargetError(FileExistsError):
    """The export folder holds something that is not a previous export; the message says what and how to proceed."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the classic read: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def apply_umask_modes(root: Path) -> None:
    """Give `root` and everything below it the modes a plain `open()` / `mkdir()` would: 0o666 (files) and
    0o777 (folders) minus the umask. Libraries that write through `mkstemp` leave 0o600 files behind."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def export_files(directory: Path) -> list[str]:
    """Relative paths (POSIX) of every file below `directory` except the marker, sorted."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir() and p.name != EXPORT_INFO_FILE
    )


def scan_export(directory: Path) -> dict[str, dict]:
    """Every entry below `directory` except the marker, by relative POSIX path: `{"kind": "dir"}`, `{"kind":
    "symlink"}` (never followed) or `{"kind": "file", "size": bytes, "sha256": hex or None above HASHED_BYTES}`."""
    entries: dict[str, dict] = {}
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if rel == EXPORT_INFO_FILE:
                continue
            if path.is_symlink():
                entries[rel] = {"kind": "symlink"}
            elif path.is_dir():
                entries[rel] = {"kind": "dir"}
            else:
                size = path.stat().st_size
                entries[rel] = {"kind": "file", "size": size, "sha256": _sha256(path) if size <= HASHED_BYTES else None}
    return entries


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _modifications(out_dir: Path, info: dict) -> list[str]:
    """What changed in a previous export since it was written, as "added X (folder)" / "changed X" phrases."""
    manifest = info.get("manifest")
    if not isinstance(manifest, dict):  # an export written before the manifest: its file list only
        listed = {str(f) for f in info.get("files") or []}
        if not isinstance(info.get("files"), list):
            return []
        manifest = {f: {"kind": "file"} for f in listed}
        manifest.update({parent.as_posix(): {"kind": "dir"} for f in listed for parent in Path(f).parents
                         if parent != Path(".")})
    found, changes = scan_export(out_dir), []
    for rel, entry in sorted(found.items()):
        written = manifest.get(rel)
        if written is None or written.get("kind") != entry["kind"]:
            kind = {"dir": " (folder)", "symlink": " (symbolic link)"}.get(entry["kind"], "")
            changes.append(f"added {rel}{kind}")
        elif entry["kind"] == "file" and any(k in written and written[k] != entry[k] for k in ("size", "sha256")):
            changes.append(f"changed {rel}")
    return changes


def describe_export_target(out_dir: Path) -> str | None:
    """None when `out_dir` may be replaced by an export (it does not exist, is empty, or is a previous export as
    it was written); else why not, for the error message.

    A previous export is recognised by the marker `aesl_export.json` it wrote (`"exported_by": "aesl-lightning
    ..."`); its `manifest` (see `scan_export`; older exports: the `files` list) must cover every entry in the
    folder, with the same size and sha256: files, folders or symbolic links a user added, and files a user edited,
    are never replaced without `overwrite=True` (files a user deleted are).
    """
    if not out_dir.exists():
        return None
    if out_dir.is_symlink() or not out_dir.is_dir():
        return "it exists and is not a directory (or is a symbolic link)"
    entries = list(out_dir.iterdir())
    if not entries:
        return None
    if not _has_marker(out_dir):
        names = sorted(p.name for p in entries)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"it is not empty and not an aesl-lightning export (no {EXPORT_INFO_FILE} marker); it holds {shown}"
    changes = _modifications(out_dir, json.loads((out_dir / EXPORT_INFO_FILE).read_text(encoding="utf-8")))
    if changes:
        shown = ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")
        return f"it is a previous export, modified since it was written: {shown}"
    return None


def check_export_target(out_dir: str | os.PathLike, overwrite: bool | None = None) -> None:
    """Raise `ExportTargetError` (or NotADirectoryError) if an export to `out_dir` may not replace what is there.

    `overwrite=None` (the default): replace only a missing or empty folder or a previous export (see
    `describe_export_target`); `True`: replace any folder; `False`: never replace (a later export is discarded).
    Call it before the expensive part of an export so that a refusal comes at once.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir.is_symlink() or not out_dir.is_dir()):
        raise NotADirectoryError(f"export target {out_dir} exists and is not a directory (or is a symbolic link); "
                                 "choose another folder")
    if overwrite is None:
        why = describe_export_target(out_dir)
        if why is not None:
            raise ExportTargetError(
                f"export target {out_dir}: refusing to replace it: {why}. Choose an empty or new folder, or pass "
                "overwrite=True (CLI: --overwrite) to replace it with everything in it"
            )


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` (holding only an "incomplete" marker); on success it becomes
    `out_dir`.

    On an exception the temporary directory is removed and `out_dir` is left as it was. An existing
    `out_dir` is moved aside and deleted only after the new one is in place, and only as `overwrite`
    allows (see `check_export_target`; checked before and again at the rename): `None` replaces an empty
    folder or a previous export, `True` anything, and `False` keeps an `out_dir` that exists by the time
    of the rename (another process won the race) and discards the new copy. The temporary directory is
    named `.<name>.tmp-<pid>-<hex>`; `clean_stale_exports` removes those left by killed processes.
    Files and folders get the umask's modes (`apply_umask_modes`).
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_exports(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: that would make the final directory private (0700)
    try:
        # marked at once, so that the leftover of a killed export is recognisable (`clean_stale_exports`)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps({"exported_by": f"aesl-lightning {__version__}", "status": "incomplete"}))
        yield tmp
        apply_umask_modes(tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clean_stale_exports(out_dir)  # an `.old-` copy kept while out_dir was missing is stale now


_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_exports(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of killed exports to `out_dir` and return them.

    A leftover is a folder beside `out_dir` named `.<name>.tmp-<pid>-<8 hex>` or `.<name>.old-<pid>-<8 hex>`
    (the names `atomic_directory` gives them) whose process `<pid>` is no longer running, and which carries
    the toolkit's marker (`aesl_export.json` with `exported_by: aesl-lightning`, written first into every
    temporary folder) or is empty. An `.old-` folder (a previous export moved aside) is removed only once
    `out_dir` exists again; if a kill came between the two renames it is the only copy and is kept (a warning
    says where). Anything else, including a live process's folder, is left alone.
    """
    out_dir = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}({re.escape(_TMP_INFIX)}|{re.escape(_OLD_INFIX)})(\d+)-[0-9a-f]{{8}}$")
    removed: list[Path] = []
    if not out_dir.parent.is_dir():
        return removed
    for candidate in sorted(out_dir.parent.iterdir()):
        match = pattern.match(candidate.name)
        if not match or candidate.is_symlink() or not candidate.is_dir():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if not (_has_marker(candidate) or not any(candidate.iterdir())):
            continue  # the name matches but the content is not ours
        if match.group(1) == _OLD_INFIX and not out_dir.exists():
            log.warning("%s holds the previous export of %s (an export was killed while swapping them); move it "
                        "back by hand if you want it", candidate, out_dir)
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    if removed:
        log.info("removed %d leftover(s) of interrupted exports: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def _has_marker(folder: Path) -> bool:
    try:
        info = json.loads((folder / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and str(info.get("exported_by", "")).startswith("aesl-lightning")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool | None) -> None:
    if not out_dir.exists():
        try:
            os.rename(tmp, out_dir)
            return
        except OSError:
            if not out_dir.exists():
                raise
            # Another process created out_dir between the check and the rename.
    if overwrite is False:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    check_export_target(out_dir, overwrite)  # again: it may have changed while the export was written
    old = out_dir.parent / f".{out_dir.name}{_OLD_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_info(out_dir: Path, **info) -> None:
    """The marker: who wrote the export, its format, the files it holds and their manifest (`scan_export`), which
    `describe_export_target` compares with the folder before replacing it."""
    info = {"exported_by": f"aesl-lightning {__version__}", **info, "files": export_files(out_dir),
            "manifest": scan_export(out_dir)}
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
