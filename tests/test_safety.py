"""Crafted checkpoints never run code: the export subcommand, HFExport(source="best") and the checkpoint loader
refuse them with a message that names the file, and the payload (which would create a file) never runs."""

import sys
from types import SimpleNamespace

import pytest
import torch

from aesl_lightning.training.callbacks import HFExport
from aesl_lightning.cli import main
from aesl_lightning.modules.checkpoint_load import UnsafeCheckpointError, load_checkpoint


class Payload:
    """Unpickling this calls open(path, "w"), which creates `path`: proof that a payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted(path, proof, **extra):
    torch.save({"aesl_lightning": {"module_class": "aesl_lightning.modules.sft.SFTModule"}, "state_dict": {},
                "hyper_parameters": {"name_or_path": "tiny-llama"}, "payload": Payload(proof), **extra}, path)
    return path


def test_the_payload_would_run_under_plain_unpickling(tmp_path):
    """The control: the crafted file really is dangerous, so the refusals below are meaningful."""
    proof = tmp_path / "pwned"
    crafted(tmp_path / "evil.ckpt", proof)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert proof.exists()


def test_export_refuses_a_crafted_checkpoint(tmp_path):
    proof = tmp_path / "pwned"
    evil = crafted(tmp_path / "evil.ckpt", proof)
    with pytest.raises(UnsafeCheckpointError, match=r"evil.ckpt: refused to load: torch.load\(weights_only=True\)"):
        main(["export", "--ckpt", str(evil), "--out", str(tmp_path / "out")])
    assert not proof.exists() and not (tmp_path / "out").exists()


def test_load_checkpoint_names_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(UnsafeCheckpointError, match="text.ckpt: refused to load"):
        load_checkpoint(tmp_path / "text.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="expected a Lightning checkpoint"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_export_imports_only_the_toolkits_module_classes(tmp_path, monkeypatch):
    # A module on the path that would leave a file behind if imported.
    proof = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(proof)!r}, 'w').close()\nclass Module: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("evil_module.Module", "os.system", "aesl_lightning..x", "aesl_lightning.infra.tiny.tiny_model",
                 "aesl_lightning.tiny.tiny_model"):  # the last two: a function, under its new and old module names
        torch.save({"aesl_lightning": {"module_class": name}, "state_dict": {}}, tmp_path / "x.ckpt")
        with pytest.raises(UnsafeCheckpointError, match="module class"):
            main(["export", "--ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "out")])
    assert not proof.exists() and "evil_module" not in sys.modules


def test_export_refuses_trust_remote_code_unless_asked(tmp_path, monkeypatch):
    from aesl_lightning.modules.sft import SFTModule

    torch.save({"aesl_lightning": {"module_class": "aesl_lightning.modules.sft.SFTModule"}, "state_dict": {},
                "hyper_parameters": {"name_or_path": "someone/model-with-code", "trust_remote_code": True}},
               tmp_path / "remote.ckpt")
    monkeypatch.setattr(SFTModule, "load_from_checkpoint", classmethod(lambda *a, **k: pytest.fail("model built")))
    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code=True.*--trust-remote-code"):
        main(["export", "--ckpt", str(tmp_path / "remote.ckpt"), "--out", str(tmp_path / "out")])


def test_export_refuses_a_users_folder_before_reading_the_checkpoint(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to replace it.*keep.txt.*--overwrite"):
        main(["export", "--ckpt", str(tmp_path / "does-not-matter.ckpt"), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"


def _trainer(best_model_path, dirpath):
    checkpoint_callback = SimpleNamespace(best_model_path=str(best_model_path), dirpath=str(dirpath))
    return SimpleNamespace(interrupted=False, checkpoint_callback=checkpoint_callback, is_global_zero=True,
                           logger=None, default_root_dir=str(dirpath), ckpt_path=None)


def _module():
    return SimpleNamespace(export_hf=lambda *a, **k: pytest.fail("exported"), model=torch.nn.Linear(1, 1),
                           load_state_dict=lambda state: pytest.fail("loaded"))


def test_hf_export_best_refuses_a_crafted_best_checkpoint(tmp_path):
    proof = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    evil = crafted(tmp_path / "checkpoints" / "best.ckpt", proof)
    with pytest.raises(UnsafeCheckpointError, match="best.ckpt: refused to load"):
        HFExport(source="best", dirpath=str(tmp_path / "hf")).on_fit_end(_trainer(evil, tmp_path / "checkpoints"), _module())
    assert not proof.exists() and not (tmp_path / "hf").exists()


def test_hf_export_best_never_follows_a_path_outside_the_checkpoint_folder(tmp_path):
    proof = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    evil = crafted(tmp_path / "elsewhere.ckpt", proof)
    for best in (evil, tmp_path / "checkpoints" / ".." / "elsewhere.ckpt"):
        with pytest.raises(ValueError, match="outside the ModelCheckpoint folder"):
            HFExport(source="best").on_fit_end(_trainer(best, tmp_path / "checkpoints"), _module())
    assert not proof.exists()


def test_hf_export_refuses_a_users_folder_at_fit_start(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    trainer = _trainer("", tmp_path)
    with pytest.raises(FileExistsError, match="keep.txt"):
        HFExport(dirpath=str(tmp_path / "hf")).on_fit_start(trainer, _module())
    HFExport(dirpath=str(tmp_path / "hf"), overwrite=True).on_fit_start(trainer, _module())  # asked for: allowed
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
