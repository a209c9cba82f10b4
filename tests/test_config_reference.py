"""docs/config-reference.md is what scripts/config_reference.py generates from the classes, so it cannot go stale."""

import importlib.util
import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config-reference.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


config_reference = _load_script()


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    return config_reference.generate()


def _rows(text: str) -> dict[str, tuple[str, str]]:
    """{option: (default, meaning)} of every table row in `text` (the first row of an option wins)."""
    rows = {}
    for option, default, meaning in re.findall(r"^\| `([^`]+)` \| (.*?) \| (.*) \|$", text, re.MULTILINE):
        rows.setdefault(option, (default, meaning))
    return rows


def test_the_committed_page_is_the_generated_one(blocks):
    text = DOC.read_text()
    assert config_reference.render(text, blocks) == text, (
        "docs/config-reference.md is out of date: run `python scripts/config_reference.py` and commit the result")


def test_known_options_appear_with_their_true_defaults(blocks):
    from aesl_lightning.maths.loss_config import LossConfig
    from aesl_lightning.modules.grpo_config import GRPOConfig

    sft = _rows(blocks["sft"])
    assert sft["model.loss.tau_tok"][0] == f"`{LossConfig().tau_tok!r}`" == "`0.9`"
    assert sft["model.gate_check_batches"][0] == "`8`"
    assert sft["model.update_norm_every_n_steps"][0] == "`1`"
    assert sft["model.loss"][0] == "see below"
    for field in fields(LossConfig):  # every LossConfig field, with its default and a description
        default, meaning = sft[f"model.loss.{field.name}"]
        assert default == f"`{field.default!r}`" and meaning, field.name
    assert "window" in {f.name for f in fields(LossConfig)}

    grpo = _rows(blocks["grpo"])
    assert grpo["model.lr"][0] == "`1e-06`" and sft["model.lr"][0] == "`2e-05`"  # each module's own defaults
    assert grpo["model.grpo.reward_funcs"][0] == f"`{GRPOConfig().reward_funcs!r}`"  # the factory's value
    assert grpo["data.synthetic"][0] == "see above"
    assert "\\|log pi_sampler - log pi_old\\|" in grpo["model.grpo.log_sampler_mismatch"][1]  # pipes escaped

    callbacks = _rows(blocks["callbacks"])
    assert callbacks["HFExport.overwrite"][0] == "`False`"
    assert callbacks["ValidationSchedule.base"][0] == "`2.0`"
    assert "**`RunSummary`**" in blocks["callbacks"] and "no options" in blocks["callbacks"]


def test_check_reports_a_stale_page_and_rewrite_fixes_it(tmp_path, capsys, blocks, monkeypatch):
    monkeypatch.setattr(config_reference, "generate", lambda: blocks)  # generated once for the module
    page = tmp_path / "config-reference.md"
    page.write_text(DOC.read_text().replace("| `model.loss.tau_tok` | `0.9` |", "| `model.loss.tau_tok` | `0.8` |"))
    assert config_reference.main(["--check", "--file", str(page)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "python scripts/config_reference.py" in err and "`0.8`" in err
    assert config_reference.main(["--file", str(page)]) == 0
    assert page.read_text() == DOC.read_text()
    assert config_reference.main(["--check", "--file", str(page)]) == 0


def test_a_page_without_a_block_marker_is_refused(blocks):
    text = DOC.read_text().replace("<!-- generated: scripts/config_reference.py grpo -->", "")
    with pytest.raises(config_reference.ConfigReferenceError, match="grpo"):
        config_reference.render(text, blocks)


def test_an_undocumented_or_stale_parameter_stops_the_generator(monkeypatch):
    class Undocumented:
        """A class.

        Args:
            a: The a.
        """

        def __init__(self, a: int = 1, b: int = 2) -> None: ...

    class Stale:
        """A class.

        Args:
            a: The a.
            gone: A parameter that was removed.
        """

        def __init__(self, a: int = 1) -> None: ...

    table = config_reference.Table("x", "x.X")
    monkeypatch.setattr(config_reference, "load", lambda path: Undocumented)
    with pytest.raises(config_reference.ConfigReferenceError, match=r"no description of \['b'\]"):
        config_reference.render_table(table, [table], 0)
    monkeypatch.setattr(config_reference, "load", lambda path: Stale)
    with pytest.raises(config_reference.ConfigReferenceError, match=r"describes \['gone'\]"):
        config_reference.render_table(table, [table], 0)
