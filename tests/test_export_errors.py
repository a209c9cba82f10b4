"""`python -m aesl_lightning export` refusals are one line naming the path, not a traceback (issue 26 item 8)."""

from __future__ import annotations

import errno

import pytest

from aesl_lightning import cli


def _export_error(capsys, monkeypatch, *argv) -> str:
    monkeypatch.setattr("sys.argv", ["aesl_lightning", "export", *argv])  # as `python -m aesl_lightning export ...`
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_export_refusals_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AESL_DEBUG", raising=False)
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    err = _export_error(capsys, monkeypatch, "--ckpt", str(tmp_path / "model.ckpt"), "--out", str(link))
    assert err.startswith(f"error: export target {link} exists and is not a directory (or is a symbolic link)")
    err = _export_error(capsys, monkeypatch, "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out"))
    assert err.startswith("error:") and "missing.ckpt" in err
    import aesl_lightning.modules.lm as lm

    for code, words in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        def fail(*_, code=code, words=words, **__):
            raise OSError(code, words, str(tmp_path / "out"))

        monkeypatch.setattr(lm, "export_checkpoint", fail)
        err = _export_error(capsys, monkeypatch, "--ckpt", "m.ckpt", "--out", str(tmp_path / "out"))
        assert err.splitlines()[0] == f"error: [Errno {code}] {words}: '{tmp_path / 'out'}'"
    monkeypatch.undo()
    with pytest.raises(NotADirectoryError):  # main(argv) called from Python raises the exception itself
        cli.main(["export", "--ckpt", "m.ckpt", "--out", str(link)])
