"""Generate the option tables of docs/config-reference.md from the classes the CLI exposes.

    python scripts/config_reference.py           # rewrite docs/config-reference.md in place
    python scripts/config_reference.py --check   # exit 1 if the committed file is out of date

Each table lists a class's constructor parameters (a dataclass's fields) with their real defaults, and as meaning the
parameter's description from the "Args:" section of the docstrings, parsed with docstring-parser as LightningCLI
(jsonargparse) does for `--model.help`: the text of a table is the text of the CLI's help. Only the parts between
`<!-- generated: scripts/config_reference.py NAME -->` and `<!-- end generated -->` are written (NAME is a block of
`BLOCKS`); the prose around them is the page's own. A parameter without a description, or a description of a
parameter that does not exist, stops the generator: fix the docstring, not the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config-reference.md"
SCRIPT = "scripts/config_reference.py"
START = re.compile(rf"^<!-- generated: {re.escape(SCRIPT)} (\w+) -->[ \t]*$", re.MULTILINE)
END = "<!-- end generated -->"


@dataclass(frozen=True)
class Table:
    """One table: the options of `cls` (an import path) under `prefix` (`model.loss`, `data`, a callback's name)."""

    prefix: str
    cls: str


BLOCKS: dict[str, list[Table]] = {
    "sft": [
        Table("model", "aesl_lightning.modules.sft.SFTModule"),
        Table("model.loss", "aesl_lightning.maths.loss_config.LossConfig"),
        Table("model.val_generation", "aesl_lightning.modules.evaluation.ValidationGeneration"),
        Table("model.lora", "aesl_lightning.infra.lora.LoRAConfig"),
        Table("data", "aesl_lightning.data.datamodule.SFTDataModule"),
        Table("data.synthetic", "aesl_lightning.data.synthetic.ArithmeticConfig"),
    ],
    "grpo": [
        Table("model", "aesl_lightning.modules.grpo.GRPOModule"),
        Table("model.grpo", "aesl_lightning.modules.grpo_config.GRPOConfig"),
        Table("model.evaluation", "aesl_lightning.modules.grpo_config.GRPOEvaluation"),
        Table("data", "aesl_lightning.data.datamodule.PromptDataModule"),
    ],
    "callbacks": [
        Table("DiversityEarlyStopping", "aesl_lightning.training.early_stopping.DiversityEarlyStopping"),
        Table("ValidationSchedule", "aesl_lightning.training.val_schedule.ValidationSchedule"),
        Table("HFExport", "aesl_lightning.training.callbacks.HFExport"),
        Table("RunSummary", "aesl_lightning.training.callbacks.RunSummary"),
    ],
}
"""The generated blocks of the page, in page order, and their tables in order."""


class ConfigReferenceError(Exception):
    """The page or a docstring does not allow generating the tables."""


# ----------------------------------------------------------------------------------------------------
# Classes


def load(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def public_name(cls: type) -> str | None:
    """`aesl_lightning.X` if the package root exports `cls` under that name, else None."""
    import aesl_lightning

    exports = getattr(aesl_lightning, "_EXPORTS", {})
    if exports.get(cls.__name__) == cls.__module__:
        return f"aesl_lightning.{cls.__name__}"
    return None


def _doc_sources(cls: type) -> list:
    """Where the parameters' descriptions come from, the later winning, as jsonargparse reads them: the package's
    base classes (most basic first), the class's own `__init__`, the class. Lightning's and Python's bases are left
    out, so the page does not depend on their versions (they document no parameter of these classes)."""
    bases = [b for b in inspect.getmro(cls)[1:] if b.__module__.split(".")[0] == "aesl_lightning"]
    sources = [*bases[::-1]]
    if "__init__" in vars(cls) and not dataclasses.is_dataclass(cls):
        sources.append(vars(cls)["__init__"])
    return [*sources, cls]


def descriptions(cls: type) -> tuple[dict[str, str], set[str]]:
    """({parameter: description} merged over `_doc_sources`, the parameters the class's own docstrings document)."""
    import docstring_parser

    merged: dict[str, str] = {}
    own: set[str] = set()
    for source in _doc_sources(cls):
        if not source.__doc__:
            continue
        parsed = docstring_parser.parse(source.__doc__, style=docstring_parser.DocstringStyle.AUTO)
        for param in parsed.params:
            if param.description:
                merged[param.arg_name] = param.description
                if source is cls or source is vars(cls).get("__init__"):
                    own.add(param.arg_name)
    return merged, own


def parameters(cls: type) -> list[tuple[str, object]]:
    """[(name, default)] of the constructor, in order; a dataclass field's `default_factory` is called, a required
    parameter's default is `inspect.Parameter.empty`."""
    factories = {}
    if dataclasses.is_dataclass(cls):
        factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING}
    result = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        result.append((name, factories[name]() if name in factories else param.default))
    return result


# ----------------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    """One line of table cell: whitespace collapsed (descriptions wrap in the docstrings), pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    # a backtick inside a code span needs a longer fence
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _default(prefix: str, default: object, tables: list[Table], here: int) -> str:
    """The default column: the value's repr, or a reference to the table of a nested config that has its
    defaults (`see below` / `see above`), `required` for a parameter without one."""
    if default is inspect.Parameter.empty:
        return "required"
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        cls = type(default)
        try:
            plain = default == cls()
        except Exception:  # a config without defaults for every field
            plain = False
        if plain:
            for index, table in enumerate(tables):
                if table.prefix == prefix and load(table.cls) is cls:
                    return "see below" if index > here else "see above"
    return _code(repr(default))


def render_table(table: Table, tables: list[Table], here: int) -> str:
    """The markdown of `tables[here]` (`tables`: every table of the page in order, for `see below` / `above`)."""
    cls = load(table.cls)
    where = f"{cls.__module__}.{cls.__qualname__}"
    public = public_name(cls)
    title = f"**`{table.prefix}`** " + (f"(`{public}`, defined in `{cls.__module__}`)" if public else f"(`{where}`)")
    params = parameters(cls)
    docs, own = descriptions(cls)
    names = {name for name, _ in params}
    missing = [name for name in names if name not in docs]
    if missing:
        raise ConfigReferenceError(f"{where}: no description of {sorted(missing)} in the docstring's Args: section "
                                   "(the CLI's help would show none either); document them there")
    stale = sorted(own - names)
    if stale:
        raise ConfigReferenceError(f"{where}: the docstring describes {stale}, which the constructor does not take")
    if not params:
        return f"{title}: no options."
    rows = [title, "", "| option | default | meaning |", "| --- | --- | --- |"]
    for name, default in params:
        rows.append(f"| `{table.prefix}.{name}` | {_cell(_default(f'{table.prefix}.{name}', default, tables, here))} "
                    f"| {_cell(docs[name])} |")
    return "\n".join(rows)


def generate() -> dict[str, str]:
    """{block name: its generated markdown}."""
    tables = [table for block in BLOCKS.values() for table in block]
    result, index = {}, 0
    for name, block in BLOCKS.items():
        parts = []
        for _ in block:
            parts.append(render_table(tables[index], tables, index))
            index += 1
        result[name] = "\n\n".join(parts)
    return result


def render(text: str, blocks: dict[str, str] | None = None) -> str:
    """`text` (the page) with each generated block replaced by its current content."""
    blocks = generate() if blocks is None else blocks
    out, pos, seen = [], 0, []
    for match in START.finditer(text):
        name = match.group(1)
        if match.start() < pos:
            continue  # inside the previous block: replaced with it
        if name not in blocks:
            raise ConfigReferenceError(f"unknown generated block {name!r} (known: {', '.join(blocks)})")
        if name in seen:
            raise ConfigReferenceError(f"generated block {name!r} appears twice")
        end = text.find(END, match.end())
        if end < 0:
            raise ConfigReferenceError(f"generated block {name!r} has no {END!r} after it")
        seen.append(name)
        out += [text[pos:match.end()], "\n\n", blocks[name], "\n\n"]
        pos = end
    out.append(text[pos:])
    absent = [name for name in blocks if name not in seen]
    if absent:
        raise ConfigReferenceError(f"no marker for the generated block(s) {absent}: add "
                                   f"'<!-- generated: {SCRIPT} NAME -->' ... '{END}' to the page")
    if seen != [name for name in blocks if name in seen]:
        raise ConfigReferenceError(f"generated blocks in the order {seen}, expected {list(blocks)}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date instead of writing it")
    parser.add_argument("--file", type=Path, default=DOC, help="the page (default: %(default)s)")
    args = parser.parse_args(argv)
    text = args.file.read_text()
    try:
        new = render(text)
    except ConfigReferenceError as err:
        print(f"{SCRIPT}: {err}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), f"{args.file} (committed)",
                                        f"{args.file} (generated)", lineterm="", n=0)
            lines = list(diff)
            shown = "\n".join(lines[:40]) + (f"\n... ({len(lines) - 40} more diff lines)" if len(lines) > 40 else "")
            print(f"{args.file} is out of date with the classes' signatures and docstrings; regenerate it with\n"
                  f"    python {SCRIPT}\n{shown}", file=sys.stderr)
            return 1
        print(f"{args.file} is up to date")
        return 0
    if new != text:
        args.file.write_text(new)
        print(f"wrote {args.file}")
    else:
        print(f"{args.file} is up to date")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the checkout's package, also when it is not installed
    sys.exit(main())
