"""Checkpoints on disk: atomic saves, resuming from the newest readable one, and the names a checkpoint may import.

- `AtomicCheckpointIO`: Lightning's `TorchCheckpointIO` whose saves write a temporary file beside the target (same
  folder, so the same filesystem), fsync it, and `os.replace` it over the final name. A kill or a full disk while
  writing leaves the previous file under the final name untouched and never a partial file there; on an exception
  the temporary file is removed, and the leftovers of killed writers (our name pattern, a dead process) are removed
  by the next save into that folder. `install_atomic_checkpoint_io(trainer)` puts it into a trainer whose strategy
  uses the plain `TorchCheckpointIO` (the CLI and every module of the toolkit do so for every run;
  `prepare_checkpointing` also removes the leftovers a killed run left beside the checkpoint a run resumes from).
- `newest_readable`: the newest of several checkpoints that `torch.load(weights_only=True)` reads; unreadable ones
  (truncated, refused) are skipped with a warning.
- `checkpoint_names`: while a module is rebuilt from a checkpoint's hyper-parameters, importing a name the
  checkpoint holds (a reward function) is limited to the toolkit's built-ins and the names the caller allows.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from aesl_lightning._compat import canonical_name
from aesl_lightning.infra.export_folder import pid_alive

log = logging.getLogger("aesl_lightning")

_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.aesl-tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _fsync_dir(folder: Path) -> None:
    # the rename is durable only once the folder's entry is on disk; some filesystems refuse to open a folder
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove `.<name>.aesl-tmp-<pid>-<8 hex>` files in `folder` (the temporary names `atomic_save` gives) whose
    process is no longer running, and return them. Anything else, a live process's file included, stays."""
    removed = []
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        match = _TMP_PATTERN.match(candidate.name)
        if not match or candidate.is_symlink() or not candidate.is_file():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    if removed:
        log.info("removed %d leftover(s) of interrupted checkpoint saves: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def atomic_save(checkpoint: Any, path: str | os.PathLike) -> None:
    """`torch.save(checkpoint)` to `path` atomically: write `.<name>.aesl-tmp-<pid>-<hex>` in the same folder, flush
    and fsync it, `os.replace` it over `path`, fsync the folder. Any failure (disk full, a kill as an exception)
    removes the temporary file and re-raises; `path` then holds what it held before (or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp = path.parent / f".{path.name}.aesl-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with `atomic_save` for local paths (a temporary file beside the target, fsync, rename).

    Lightning's own save writes through fsspec's transaction, whose temporary file lives in the system temp folder:
    with the run folder on another filesystem the final step is a copy over the target, and a kill during it
    destroys the previous checkpoint. Remote URLs (`s3://...`) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        atomic_save(checkpoint, str(path).removeprefix("file://"))


def install_atomic_checkpoint_io(trainer) -> bool:
    """Give `trainer`'s strategy an `AtomicCheckpointIO` if it uses the plain `TorchCheckpointIO` (a user's own
    plugin, or a strategy's special one, is kept). Returns whether it installed."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def prepare_checkpointing(trainer) -> None:
    """At the start of fit: `install_atomic_checkpoint_io`, and when resuming, remove (rank 0) what a kill of the
    resumed run left beside its checkpoint: temporary checkpoint files in its folder (`clean_stale_temporaries`)
    and unfinished exports `.hf_model.tmp-*` in its run folder and its `turning_point/` folder (only the toolkit's
    own: name, marker and a dead process, see `aesl_lightning.infra.export.clean_stale_exports`)."""
    from aesl_lightning.infra.export import clean_stale_exports

    install_atomic_checkpoint_io(trainer)
    resumed = getattr(trainer, "ckpt_path", None)
    if not resumed or not trainer.is_global_zero or "://" in str(resumed) or not Path(resumed).is_file():
        return
    folder = Path(resumed).resolve().parent
    clean_stale_temporaries(folder)
    for run in (folder, folder.parent):
        for export in (run / "hf_model", run / "turning_point" / "hf_model"):
            clean_stale_exports(export)


def newest_readable(candidates: Iterable[Path], load: Callable[[Path], Any]) -> tuple[Path | None, list[str]]:
    """The most recently modified of `candidates` that `load` reads without an `OSError` or `ValueError` (the CLI
    passes `aesl_lightning.modules.lm.load_checkpoint`: weights_only, memory-mapped), and one line per newer candidate
    skipped as unreadable (each also logged as a warning)."""
    skipped: list[str] = []
    ordered = sorted({Path(p) for p in candidates}, key=lambda p: (p.stat().st_mtime_ns, str(p)), reverse=True)
    for path in ordered:
        try:
            load(path)
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            skipped.append(f"{path}: {reason}")
            log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, reason)
            continue
        return path, skipped
    return None, skipped


# --------------------------------------------------------------------------------------------------------------
# names a checkpoint may import

_ALLOWED_NAMES: contextvars.ContextVar[tuple[frozenset[str], str] | None] = contextvars.ContextVar(
    "aesl_checkpoint_names", default=None
)


@contextmanager
def checkpoint_names(allowed: Iterable[str], source: str) -> Iterator[None]:
    """Inside this block, names read from a checkpoint (`source`, for messages) are not trusted: only the
    toolkit's built-in reward functions and `allowed` may be imported (see `untrusted_name`). A name under a module's
    old flat path (`aesl_lightning.rewards.f`) counts as its new one (`aesl_lightning.scoring.rewards.f`)."""
    token = _ALLOWED_NAMES.set((frozenset(canonical_name(n) for n in allowed), source))
    try:
        yield
    finally:
        _ALLOWED_NAMES.reset(token)


def untrusted_name(name: str, builtins: Iterable[str]) -> str | None:
    """None if `name` may be imported now (outside `checkpoint_names`, or a built-in, or allowed); else the
    source (the checkpoint) whose name it is."""
    current = _ALLOWED_NAMES.get()
    if current is None:
        return None
    allowed, source = current
    name = canonical_name(name)
    return None if name in allowed or name in {canonical_name(b) for b in builtins} else source
