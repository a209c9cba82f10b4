"""The package's layers (docs/architecture.md): no import cycles, no import from a lower layer to a higher one, and
the flat module names of earlier versions still import, as the same module objects, with a warning naming the new
path. The graph is read from the source (ast), every import statement counted: module level, inside functions,
under `if TYPE_CHECKING:`, relative (`from . import x`) and absolute."""

import ast
import importlib
import runpy
import sys
from pathlib import Path

import pytest

import aesl_lightning
from aesl_lightning._compat import MOVED, RUN_AS_MAIN, canonical_name

PACKAGE = Path(aesl_lightning.__file__).resolve().parent

LAYERS = (
    ("base", ("aesl_lightning", "aesl_lightning._compat")),
    ("ops", ("aesl_lightning.ops",)),
    ("maths", ("aesl_lightning.maths", "aesl_lightning.metrics")),
    ("scoring", ("aesl_lightning.scoring",)),
    ("infra", ("aesl_lightning.infra",)),
    ("data", ("aesl_lightning.data",)),
    ("modules", ("aesl_lightning.modules",)),
    ("training", ("aesl_lightning.training",)),
    ("entry", ("aesl_lightning.cli", "aesl_lightning.calibrate", "aesl_lightning.__main__", "aesl_lightning.study")),
)
"""Lowest first. A module may import its own layer (without a cycle) and the layers below it, never one above.
The package root ("aesl_lightning", its `__init__`) matches only itself; every other name matches its sub-tree."""


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package under `package` (a folder named like the package), by dotted name."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The names an import statement in `module` brings in: a module of `known` or an old module name where the
    name is one (`from pkg import submodule`), else the module imported from (`from module import function`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    modules = known | set(MOVED)
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (any import statement anywhere in its source). A name
    inside the package that is no module of it (an old alias, a typo) is kept as it is, so a check can name it."""
    names = module_names(package)
    known = set(names)
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                is_package = path.name == "__init__.py"
                for name in _imported(node, module, is_package, known):
                    if name == package.name or name.startswith(package.name + "."):
                        targets.add(name)
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of the layer `module` belongs to (the longest matching prefix), None if none."""
    best, best_length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "aesl_lightning" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = i, len(prefix)
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per module without a layer, per import of a name that is no module, and per upward import."""
    problems = [f"{m}: in no layer of LAYERS" for m in sorted(graph) if layer_of(m) is None]
    for module in sorted(graph):
        for target in sorted(graph[module]):
            if target not in graph:
                problems.append(f"{module} imports {target}, which is no module of the package")
                continue
            low, high = layer_of(module), layer_of(target)
            if low is not None and high is not None and high > low:
                problems.append(f"{module} ({LAYERS[low][0]}) imports {target} ({LAYERS[high][0]}), a higher layer")
    return problems


# ------------------------------------------------------------------------------------------------ the checker


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "aesl_lightning" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "aesl_lightning"


def test_the_checker_sees_relative_function_level_and_type_checking_imports(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "from . import kernels\n",
        "ops/kernels.py": "def f():\n    from ..maths import gates\n",
        "maths/__init__.py": "",
        "maths/gates.py": "import typing\nif typing.TYPE_CHECKING:\n    from aesl_lightning.maths.losses import C\n",
        "maths/losses.py": "from .gates import x\nimport aesl_lightning.ops.kernels\n",
        "cli.py": "from aesl_lightning import sft\n",
    })
    graph = import_graph(package)
    assert graph["aesl_lightning.ops"] == {"aesl_lightning.ops.kernels"}
    assert graph["aesl_lightning.ops.kernels"] == {"aesl_lightning.maths.gates"}
    assert graph["aesl_lightning.maths.gates"] == {"aesl_lightning.maths.losses"}
    assert graph["aesl_lightning.maths.losses"] == {"aesl_lightning.maths.gates", "aesl_lightning.ops.kernels"}
    assert cycles(graph) == [["aesl_lightning.maths.gates", "aesl_lightning.maths.losses",
                              "aesl_lightning.ops.kernels"]]
    assert layer_violations(graph) == [
        "aesl_lightning.cli imports aesl_lightning.sft, which is no module of the package",
        "aesl_lightning.ops.kernels (ops) imports aesl_lightning.maths.gates (maths), a higher layer",
    ]


def test_the_flat_layout_before_the_sub_packages_fails_the_checks(tmp_path):
    """Three of the cycles the flat package had (issue 24), and its modules belong to no layer."""
    package = _write(tmp_path, {
        "__init__.py": "",
        "losses.py": "from aesl_lightning.gates import TokenView\n",
        "gates.py": "import typing\nif typing.TYPE_CHECKING:\n    from aesl_lightning.losses import LossConfig\n",
        "lm.py": "def register_safe_globals():\n    import aesl_lightning.sft  # noqa: F401\n",
        "sft.py": "from aesl_lightning.lm import CausalLMModule\n",
        "evaluation.py": "from aesl_lightning.sample_metrics import SampleMetrics\n",
        "sample_metrics.py": "def compute():\n    from aesl_lightning.evaluation import any_rank\n",
    })
    graph = import_graph(package)
    assert cycles(graph) == [["aesl_lightning.evaluation", "aesl_lightning.sample_metrics"],
                             ["aesl_lightning.gates", "aesl_lightning.losses"],
                             ["aesl_lightning.lm", "aesl_lightning.sft"]]
    assert "aesl_lightning.lm: in no layer of LAYERS" in layer_violations(graph)


# ------------------------------------------------------------------------------------------------ the package


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_module_imports_a_higher_layer_or_an_old_name():
    assert layer_violations(import_graph(PACKAGE)) == []


def test_every_module_stays_under_400_lines():
    long = {m: n for m, path in module_names(PACKAGE).items() if (n := len(path.read_text().splitlines())) >= 400}
    assert long == {}


# ------------------------------------------------------------------------------------------------ old names


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_is_the_new_module_with_a_warning(old, monkeypatch):
    new = MOVED[old]
    assert not (PACKAGE / f"{old.rpartition('.')[2]}.py").exists()  # an alias, not a file beside it
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"^{old} moved to {new};"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and module.__name__ == new
    assert getattr(aesl_lightning, old.rpartition(".")[2]) is module  # `from aesl_lightning import sft` as well


def test_old_class_paths_name_the_same_classes():
    with pytest.warns(DeprecationWarning):
        for old in ("aesl_lightning.sft", "aesl_lightning.grpo", "aesl_lightning.losses", "aesl_lightning.callbacks"):
            sys.modules.pop(old, None)
        from aesl_lightning.callbacks import HFExport
        from aesl_lightning.grpo import GRPOConfig, GRPOModule
        from aesl_lightning.losses import LossConfig
        from aesl_lightning.sft import SFTModule
    assert SFTModule is aesl_lightning.SFTModule and GRPOModule is aesl_lightning.GRPOModule
    assert LossConfig is aesl_lightning.LossConfig and HFExport is aesl_lightning.HFExport
    assert GRPOConfig.__module__ == "aesl_lightning.modules.grpo_config"
    assert canonical_name("aesl_lightning.sft.SFTModule") == "aesl_lightning.modules.sft.SFTModule"
    assert canonical_name("aesl_lightning.rewards.math_accuracy") == "aesl_lightning.scoring.rewards.math_accuracy"
    unmoved = "aesl_lightning.data.datamodule.SFTDataModule"
    assert canonical_name(unmoved) == unmoved
    assert canonical_name("aesl_lightning.sftx.SFTModule") == "aesl_lightning.sftx.SFTModule"


def test_an_unknown_name_under_the_package_is_still_not_found():
    for name in ("aesl_lightning.no_such_module", "aesl_lightning.sft.no_such_module"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)


@pytest.mark.parametrize("old, new", [("aesl_lightning.calibration", "aesl_lightning.calibrate"),
                                      ("aesl_lightning.plots", "aesl_lightning.training.plots")])
def test_python_dash_m_under_an_old_name_runs_the_new_command(old, new, monkeypatch, capsys):
    assert RUN_AS_MAIN.get(old, MOVED[old]) == new
    monkeypatch.delitem(sys.modules, old, raising=False)  # as in a fresh `python -m`
    monkeypatch.setattr(sys, "argv", [old, "--help"])
    with pytest.warns(DeprecationWarning, match=rf"^{old} moved to {new};"), pytest.raises(SystemExit) as exit_info:
        runpy.run_module(old, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert f"usage: python -m {new} " in capsys.readouterr().out
