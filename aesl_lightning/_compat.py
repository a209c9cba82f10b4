"""The flat module names of aesl-lightning before its sub-packages (issue 24), kept as aliases.

`import aesl_lightning.sft` (a LightningCLI `class_path: aesl_lightning.sft.SFTModule`, a checkpoint's
`_class_path` or `module_class`, a config's `aesl_lightning.rewards.math_accuracy`) gives the module that now
lives at the new path, the same module object (`aesl_lightning.sft is aesl_lightning.modules.sft`), so classes,
`isinstance` and pickled names stay one; the first such import warns (`DeprecationWarning`) naming the new path.
`python -m aesl_lightning.plots` and `python -m aesl_lightning.calibration` run the new modules' commands.

This module imports nothing of the package: it is the lowest layer, beside the package's `__init__`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED: dict[str, str] = {
    f"aesl_lightning.{old}": f"aesl_lightning.{new}" for old, new in (
        ("kernels", "ops.kernels"), ("kernel_autograd", "ops.kernel_autograd"),
        ("gates", "maths.gates"), ("loss_registry", "maths.loss_registry"), ("anchors", "maths.anchors"),
        ("losses", "maths.losses"), ("grpo_loss", "maths.grpo_loss"), ("turning_point", "maths.turning_point"),
        ("answer_values", "scoring.answer_values"), ("answers", "scoring.answers"), ("verifier", "scoring.verifier"),
        ("rewards", "scoring.rewards"),
        ("tiny", "infra.tiny"), ("lora", "infra.lora"), ("export_folder", "infra.export_folder"),
        ("export", "infra.export"), ("models", "infra.models"), ("fsdp", "infra.fsdp"),
        ("generation", "infra.generation"), ("rng_state", "infra.rng_state"), ("checkpoint_io", "infra.checkpoint_io"),
        ("lm", "modules.lm"), ("sft", "modules.sft"), ("grpo", "modules.grpo"), ("grpo_config", "modules.grpo_config"),
        ("rollout", "modules.rollout"), ("evaluation", "modules.evaluation"),
        ("sample_metrics", "modules.sample_metrics"), ("calibration", "modules.calibration"),
        ("callbacks", "training.callbacks"), ("early_stopping", "training.early_stopping"),
        ("peak_checkpoint", "training.peak_checkpoint"), ("val_schedule", "training.val_schedule"),
        ("progress", "training.progress"), ("plots", "training.plots"),
    )
}
"""Old module name -> the module it now is."""

RUN_AS_MAIN = {"aesl_lightning.calibration": "aesl_lightning.calibrate"}
"""Old names whose `python -m` command moved to another module than their functions (the CLI layer)."""


def canonical_name(name: str) -> str:
    """`name` (a module, or `module.attribute`) with an old module prefix replaced by the new one; else unchanged.
    `canonical_name("aesl_lightning.rewards.math_accuracy") == "aesl_lightning.scoring.rewards.math_accuracy"`."""
    head = name
    while head:
        if head in MOVED:
            return MOVED[head] + name[len(head):]
        head = head.rpartition(".")[0]
    return name


def old_names(module: str) -> list[str]:
    """The old names of the module now at `module` (most have one; most new modules none)."""
    return [old for old, new in MOVED.items() if new == module]


def _warn(old: str, new: str) -> None:
    # blame the first frame outside the import machinery and this file: the user's import line
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called this function
    while frame is not None and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename):
        level, frame = level + 1, frame.f_back
    warnings.warn(f"{old} moved to {new}; import it from there (the old name is an alias)", DeprecationWarning,
                  stacklevel=level)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str) -> None:
        self.old, self.new = old, MOVED[old]

    def create_module(self, spec):
        return None  # a placeholder: exec_module puts the real module in its place

    def exec_module(self, module) -> None:
        _warn(self.old, self.new)
        # the import system returns what sys.modules holds under the old name once this returns: the new module
        sys.modules[self.old] = importlib.import_module(self.new)

    def get_code(self, fullname: str):
        """The code `python -m <old name>` runs: the new module's (or its command's, `RUN_AS_MAIN`)."""
        target = RUN_AS_MAIN.get(fullname, self.new)
        _warn(fullname, target)
        spec = importlib.util.find_spec(target)
        return spec.loader.get_code(target)

    def is_package(self, fullname: str) -> bool:
        return False


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        # the origin is the file `python -m <old name>` runs (its sys.argv[0] and __file__)
        command = importlib.util.find_spec(RUN_AS_MAIN.get(fullname, MOVED[fullname]))
        origin = command.origin if command is not None else None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname), origin=origin)


def install() -> None:
    """Put the alias finder on `sys.meta_path` (once)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
