"""Where each split's examples come from: loaded sources, held-out parts of the training source, or generated
synthetic splits; and the early check of local data files.

Validation/test sets come from their own source or are held out of the training source, deterministically
by `seed`; a synthetic training source gets freshly generated, disjoint splits instead.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

from aesl_lightning.data.formats import LOCAL_FORMATS, SYNTHETIC, DataFormatError, load_records, synthetic_records
from aesl_lightning.data.synthetic import ArithmeticConfig

__all__ = ["check_hold_out", "load_splits", "validate_local_sources", "report_split"]

log = logging.getLogger("aesl_lightning")


def load_splits(
    train: str | None,
    train_split: str,
    others: dict[str, tuple[str | None, str, int]],
    synthetic: ArithmeticConfig,
    seed: int,
    normalise: Callable[[list[tuple[str, dict]], str], list],
) -> dict[str, tuple[list, str]]:
    """Examples and an origin label per split: `{"train": (...), name: (...) for name in others}`.

    `others[name] = (source, hf_split, size)`: a split with its own source loads it (`"synthetic"`: a generated
    split disjoint from the synthetic training set); one without is `size` examples held out of `train`
    (a synthetic `train` generates them disjointly instead); size 0 and no source means no such split.
    """
    wants_synthetic = {
        name: size for name, (source, _, size) in others.items() if source == SYNTHETIC or (source is None and train == SYNTHETIC)
    }
    generated = {}
    if train == SYNTHETIC or wants_synthetic:
        sizes = {"train": synthetic.num_examples if train == SYNTHETIC else 0, **wants_synthetic}
        generated = synthetic_records(synthetic, sizes)

    splits: dict[str, tuple[list, str]] = {}
    if train is not None:
        records = generated["train"] if train == SYNTHETIC else load_records(train, train_split, synthetic)
        splits["train"] = (normalise(records, train), train)

    held_out = {
        name: size for name, (source, _, size) in others.items() if source is None and train not in (None, SYNTHETIC) and size > 0
    }
    if held_out:
        examples, _ = splits["train"]
        check_hold_out(train, len(examples), held_out)
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        start = 0
        for name, size in held_out.items():
            chosen = sorted(order[start : start + size])
            splits[name] = ([examples[i] for i in chosen], f"{train} (held out)")
            start += size
        kept = sorted(order[start:])
        splits["train"] = ([examples[i] for i in kept], train)

    for name, (source, hf_split, size) in others.items():
        if name in wants_synthetic:
            if size > 0 or source == SYNTHETIC:
                splits[name] = (normalise(generated[name], f"synthetic {name} split"), f"synthetic {name} split")
        elif source is not None:
            splits[name] = (normalise(load_records(source, hf_split, synthetic), source), source)
    return splits


def check_hold_out(train: str, available: int, held_out: dict[str, int], owner: str = "data") -> None:
    """Raise DataFormatError naming the `<name>_size` options when holding `held_out[name]` examples out of the
    `available` examples of `train` would leave none for training."""
    if sum(held_out.values()) >= available:
        sizes = ", ".join(f"{owner}.{name}_size={size}" for name, size in held_out.items())
        raise DataFormatError(
            f"{sizes}: {owner}.train ({train}) has {available} examples, too few to hold out {sum(held_out.values())} "
            f"and keep some for training; lower {' / '.join(f'{owner}.{name}_size' for name in held_out)} (0 for none) "
            f"or give {' / '.join(f'{owner}.{name}' for name in held_out)} its own file"
        )


def validate_local_sources(sources: dict[str, str | None], normalise: Callable, owner: str = "data",
                           held_out: dict[str, int] | None = None) -> None:
    """Read and normalise every local-file source now, so that a malformed file (bad JSON, a missing field, no
    records) is reported at once, before any model is built. `sources` maps option names to sources; the error
    is `DataFormatError("<owner>.<option>: <file:line>: ...")`. `held_out[name]` examples are to be held out of
    a local `train` for each split `name` without a source of its own: too few examples is an error naming the
    `<name>_size` option (`check_hold_out`). Hugging Face names and "synthetic" are checked at `setup` (they need
    the network or a generator)."""
    counts = {}
    for option, source in sources.items():
        if source is None or source == SYNTHETIC:
            continue
        path = Path(source)
        if path.suffix.lower() not in LOCAL_FORMATS and not path.exists():
            continue  # a Hugging Face dataset name
        try:
            counts[option] = len(normalise(load_records(source), source))
        except DataFormatError as error:
            raise DataFormatError(f"{owner}.{option}: {error}") from None
    wanted = {name: size for name, size in (held_out or {}).items() if sources.get(name) is None and size > 0}
    if wanted and "train" in counts:
        check_hold_out(str(sources["train"]), counts["train"], wanted, owner)


def report_split(kind: str, name: str, origin: str, kept: int, dropped: int, limit_name: str, limit: int) -> None:
    """Log how many examples a split kept and dropped (over `limit_name`); raise DataFormatError if none is left."""
    if dropped:
        log.warning(
            "%s %s: dropped %d of %d examples from %s longer than %s=%d tokens",
            *(kind, name, dropped, kept + dropped, origin, limit_name, limit),
        )
    if not kept:
        raise DataFormatError(f"{origin}: no {name} examples left after dropping {dropped} longer than {limit_name}={limit} tokens")
    log.info("%s %s: %d examples from %s", kind, name, kept, origin)
