"""`python -m aesl_lightning`: LightningCLI (fit / validate / test / predict) plus two tool subcommands.

    python -m aesl_lightning fit --config experiments/quickstart.yaml --trainer.max_steps 50
    python -m aesl_lightning fit --model aesl_lightning.SFTModule --print_config
    python -m aesl_lightning synthetic --num-examples 500 --out data.jsonl
    python -m aesl_lightning export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out my-model

The model and data classes are chosen in the config (`model.class_path`, `data.class_path`), so one entry
point runs every stage. Defaults: `aesl_lightning.SFTModule` and `aesl_lightning.SFTDataModule`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from aesl_lightning._compat import canonical_name


def make_cli(args: list[str] | None, run: bool = True):
    """Build (and by default run) the LightningCLI. Imported lazily: the tool subcommands start fast."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class AESLCLI(LightningCLI):
        """LightningCLI with the toolkit's defaults: SFT model and data, seed 0, TensorBoard in lightning_logs/."""

        def before_instantiate_classes(self) -> None:
            """Check the data files and the model path before anything is built (loading a large model first
            would make a typo in the data cost minutes)."""
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            with _clean_errors():
                check_config_sources(config)

        def instantiate_classes(self) -> None:
            with _clean_errors():
                super().instantiate_classes()

        def _parse_ckpt_path(self) -> None:
            """Lightning re-reads the model settings of `--ckpt_path FILE` into the config (the class included); here
            only after `checked_checkpoint_hparams` has refused any name the checkpoint holds that would import code
            the user's own config does not name."""
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            with _clean_errors():
                hparams = checked_checkpoint_hparams(ckpt_path, self.config[subcommand].get("model"))
            if not hparams:
                return
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise

        def instantiate_trainer(self, **kwargs):
            """The trainer, with checkpoints saved atomically beside their target (`AtomicCheckpointIO`)."""
            from aesl_lightning.infra.checkpoint_io import install_atomic_checkpoint_io

            trainer = super().instantiate_trainer(**kwargs)
            install_atomic_checkpoint_io(trainer)
            return trainer

        def before_fit(self) -> None:
            """`--ckpt_path last`: the newest last.ckpt of this run's earlier versions, or a clear stop (Lightning
            alone looks only in the new version folder, warns, and trains from scratch)."""
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") == "last":
                with _clean_errors():
                    config["ckpt_path"] = str(resolve_last_checkpoint(self.trainer))

        def instantiate_trainer(self, **kwargs):
            """The trainer, with a progress bar over the run's step budget unless the config chose a bar."""
            from aesl_lightning.training.progress import use_step_progress_bar

            trainer = super().instantiate_trainer(**kwargs)
            use_step_progress_bar(trainer)
            return trainer

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.set_defaults(
                {
                    "model": {"class_path": "aesl_lightning.modules.sft.SFTModule"},
                    "data": {"class_path": "aesl_lightning.data.datamodule.SFTDataModule"},
                }
            )

    return AESLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # each module configures its own optimiser and schedule
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "aesl-lightning: cold-start SFT (AESL), diversity early stopping and GRPO."},
        args=args,
        run=run,
    )


class ConfigError(SystemExit):
    """A configuration or input error, already printed as one line; exits with status 2 like argparse."""


def _first_error_line(error: BaseException) -> str:
    """The user's error out of jsonargparse's wrapping ("Does not validate against any of the Union subtypes
    ... Errors: - <ours> - Expected a <class 'NoneType'> ... Given value: Namespace(...)")."""
    text = str(error)
    if "Errors:" in text:
        lines = text.split("Errors:", 1)[1].split("\nGiven value", 1)[0].splitlines()
        errors = [line.strip()[2:] for line in lines if line.strip().startswith("- ")]
        errors = [e for e in errors if not e.startswith("Expected a <class 'NoneType'>")]
        if errors:
            return "; ".join(errors)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


@contextmanager
def _clean_errors():
    """Turn a configuration or input error into one line on stderr and exit status 2 (no traceback, no
    Namespace dump); `AESL_DEBUG=1` re-raises it with the traceback."""
    try:
        yield
    except (ValueError, TypeError, OSError) as error:
        if os.environ.get("AESL_DEBUG"):
            raise
        message = _first_error_line(error)
        print(f"error: {message}\n(set AESL_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        raise ConfigError(2) from None


def check_config_sources(config) -> None:
    """Validate the data sources (`validate_sources` of the data class, if it has one) and then the model path of
    a parsed LightningCLI config, before any class is instantiated."""
    import importlib

    for group, check in (("data", _check_data), ("model", _check_model)):
        node = config.get(group) if config is not None else None
        if node is None or not hasattr(node, "get") or not node.get("class_path"):
            continue
        module, _, name = str(node["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue  # jsonargparse reports an unknown class itself
        init_args = node.get("init_args")
        check(cls, dict(init_args.items()) if init_args is not None else {})


def _check_data(cls, init_args: dict) -> None:
    validate = getattr(cls, "validate_sources", None)
    if callable(validate):
        validate(**init_args)


def _check_model(cls, init_args: dict) -> None:
    from aesl_lightning.infra.models import check_model_source

    name = init_args.get("name_or_path")
    if isinstance(name, str):
        try:
            check_model_source(name, init_args.get("gguf_file"))
        except OSError as error:
            raise OSError(f"model.name_or_path: {error}") from None


def last_checkpoint_places(trainer) -> list[Path]:
    """Where `last.ckpt` files of this run live: each ModelCheckpoint's own `dirpath` if set, else every
    version folder of the logger (`<save_dir>/<name>/version_*/checkpoints`), else `<default_root_dir>/checkpoints`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    places: list[Path] = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            places.append(Path(callback.dirpath))
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root is not None:
        places += sorted(Path(root).glob("version_*/checkpoints"))
        places.append(Path(root) / "checkpoints")
    places.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(places))


def resolve_last_checkpoint(trainer) -> Path:
    """The most recently written checkpoint (`*.ckpt`) among `last_checkpoint_places(trainer)` that
    `torch.load(weights_only=True)` reads: a newer one that is truncated or refused (a kill or a full disk while it
    was written by another tool) is skipped with a warning. `FileNotFoundError` naming the places searched when
    there is none (never a silent fresh start), `ValueError` listing the unreadable ones when none is readable."""
    from aesl_lightning.infra.checkpoint_io import newest_readable
    from aesl_lightning.modules.checkpoint_load import load_checkpoint

    places = last_checkpoint_places(trainer)
    found = [p for place in places if place.is_dir() for p in place.glob("*.ckpt") if p.is_file()]
    if not found:
        searched = ", ".join(str(p) for p in places)
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt in {searched} (nor any other .ckpt); give the checkpoint's path, or "
            "leave --ckpt_path out to train from the start"
        )
    newest, skipped = newest_readable(found, load_checkpoint)
    if newest is None:
        raise ValueError(f"--ckpt_path last: no readable checkpoint: {'; '.join(skipped)}")
    logging.getLogger("aesl_lightning").info("--ckpt_path last: resuming from %s", newest)
    return newest


def _get(node, *keys):
    """`node[k1][k2]...` through dicts, jsonargparse Namespaces and dataclasses; None where a key is missing."""
    for key in keys:
        if node is None:
            return None
        if isinstance(node, dict) or hasattr(node, "__contains__") and hasattr(node, "get"):
            node = node.get(key) if key in node else None
        else:
            node = getattr(node, key, None)
    return node


def _reward_names(grpo) -> set[str]:
    names = _get(grpo, "reward_funcs")
    return {canonical_name(str(n).replace(":", ".")) for n in names} if isinstance(names, (list, tuple)) else set()


def _nested_class_paths(node, where: str) -> tuple[str, object] | None:
    """The first `class_path` / `_class_path` / `_instantiator` key inside `node` (dicts and lists), with its value."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("class_path", "_class_path", "_instantiator"):
                return f"{where}.{key}", value
            found = _nested_class_paths(value, f"{where}.{key}")
            if found:
                return found
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found = _nested_class_paths(value, f"{where}[{i}]")
            if found:
                return found
    return None


def checked_checkpoint_hparams(ckpt_path: str | os.PathLike, model_config) -> dict:
    """The model hyper-parameters of a checkpoint (read with `torch.load(weights_only=True)`), refused with
    `UnsafeCheckpointError` (naming the file and the field) when the checkpoint names code to import that the
    user's config (`model_config`: its `class_path` and `init_args`) does not:

    - `_class_path` (the model class): the user's own class path, or a LightningModule of `aesl_lightning`;
    - `grpo.reward_funcs`: built-in reward functions, or functions the user's `grpo.reward_funcs` names;
    - `trust_remote_code: true` (runs a model repository's code) only if the user's config sets it as well;
    - no `class_path` anywhere below the top level (a nested class to build).
    Lightning's top-level `_instantiator` entry is dropped (Lightning allows only its own)."""
    from lightning.pytorch import LightningModule

    from aesl_lightning.modules.grpo_config import BUILTIN_REWARDS
    from aesl_lightning.modules.checkpoint_load import UnsafeCheckpointError, load_checkpoint

    hparams = load_checkpoint(ckpt_path).get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise UnsafeCheckpointError(f"{ckpt_path}: hyper_parameters is a {type(hparams).__name__}, expected a dict")
    hparams = dict(hparams)
    hparams.pop("_instantiator", None)
    init_args = _get(model_config, "init_args")
    class_path = hparams.get("_class_path")
    if class_path is not None and class_path != _get(model_config, "class_path"):
        module, _, name = str(class_path).rpartition(".")
        cls = None
        if re.fullmatch(r"aesl_lightning(\.[A-Za-z_]\w*)*", module) and name.isidentifier():
            try:
                cls = getattr(importlib.import_module(module), name, None)  # the toolkit's own modules only
            except ImportError:
                pass
        if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
            raise UnsafeCheckpointError(
                f"{ckpt_path}: hyper_parameters._class_path names {class_path!r}, not a model class of aesl_lightning "
                "nor your config's model.class_path; a checkpoint's names are not imported. If you trust it, pass "
                f"--model {class_path}"
            )
    nested = _nested_class_paths({k: v for k, v in hparams.items() if k != "_class_path"}, "hyper_parameters")
    if nested:
        raise UnsafeCheckpointError(
            f"{ckpt_path}: {nested[0]} names a class to build ({nested[1]!r}); a checkpoint's names are not imported. "
            "Resume with the settings in your config instead"
        )
    allowed = {canonical_name(name) for name in BUILTIN_REWARDS} | _reward_names(_get(init_args, "grpo"))
    refused = sorted(_reward_names(hparams.get("grpo")) - allowed)
    if refused:
        raise UnsafeCheckpointError(
            f"{ckpt_path}: hyper_parameters.grpo.reward_funcs names {refused[0]!r}, which is neither a built-in reward "
            "nor in your config's model.init_args.grpo.reward_funcs; a checkpoint's names are not imported. If you "
            "trust it, name it in your config (--model.init_args.grpo.reward_funcs)"
        )
    if hparams.get("trust_remote_code") is True and _get(init_args, "trust_remote_code") is not True:
        raise UnsafeCheckpointError(
            f"{ckpt_path}: hyper_parameters.trust_remote_code is true (it runs code from the model repository "
            f"{hparams.get('name_or_path')!r}); set model.init_args.trust_remote_code in your config if you trust it"
        )
    return hparams


def export_main(argv: list[str]) -> Path:
    """`export`: turn a Lightning checkpoint written by this toolkit into a Hugging Face model folder."""
    parser = argparse.ArgumentParser(
        prog="python -m aesl_lightning export",
        description="Export a checkpoint written by aesl-lightning in Hugging Face format (model + tokenizer).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by an aesl-lightning run.")
    parser.add_argument("--out", required=True, help="Output folder: new, empty or a previous export (replaced atomically).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --out even if it holds files that are not a previous export (they are deleted).")
    parser.add_argument("--no-merge-lora", action="store_true", help="Save LoRA adapters separately instead of merging.")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Allow a checkpoint whose model needs trust_remote_code (runs the model repository's code).")
    args = parser.parse_args(argv)
    from aesl_lightning.modules.lm import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out, merge_lora=False if args.no_merge_lora else None,
                            overwrite=True if args.overwrite else None, trust_remote_code=args.trust_remote_code)
    print(f"Exported {args.ckpt} -> {out}")
    return out


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a handler bound to the stream of its creation breaks when
    the stream is swapped, as by pytest's capture or a redirected stderr)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """Show the toolkit's INFO messages (examples loaded, dropped, exported) without touching other loggers."""
    logger = logging.getLogger("aesl_lightning")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s aesl_lightning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Third-party messages that say nothing about the run and push it off the first screen: (category, message regex).
KNOWN_NOISE = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # lightning 2.6 on torch >= 2.10
)


class _DropTips(logging.Filter):
    """Lightning's advertisement for its cloud logger, printed at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def _quiet_known_noise() -> None:
    """Filter the known third-party deprecation messages and tips (only these: other warnings still show)."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        rank_zero = logging.getLogger(name)  # lightning's rank_zero_info logs through one of these
        if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
            rank_zero.addFilter(_DropTips())


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` defaults to the command line."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    _configure_logging()
    _quiet_known_noise()
    if argv and argv[0] == "synthetic":
        from aesl_lightning.data.synthetic import main as synthetic_main

        synthetic_main(argv[1:])
        return
    if argv and argv[0] == "export":
        # On the command line a refused target, a missing checkpoint, a full or read-only disk is one line;
        # a caller of main(argv) gets the exception itself.
        with _clean_errors() if from_command_line else nullcontext():
            export_main(argv[1:])
        return
    make_cli(None if from_command_line else argv)
