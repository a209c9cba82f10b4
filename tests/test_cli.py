"""`python -m aesl_lightning`: config parsing, overrides, help text, tool subcommands and a tiny end-to-end fit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aesl_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def _printed_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args, "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def test_quickstart_config_parses_with_dotted_overrides(capsys):
    config = _printed_config(capsys, "--model.lr", "1e-5", "--trainer.max_steps", "50", "--data.batch_size", "4")
    assert config["model"]["class_path"] == "aesl_lightning.SFTModule"
    assert config["model"]["init_args"]["name_or_path"] == "smollm2-135m-instruct"
    assert config["model"]["init_args"]["lr"] == pytest.approx(1e-5)
    assert config["model"]["init_args"]["loss"]["name"] == "aesl"
    assert config["trainer"]["max_steps"] == 50
    assert config["data"]["init_args"]["batch_size"] == 4
    assert config["data"]["init_args"]["synthetic"]["num_examples"] == 128


def test_several_config_files_merge_in_order(capsys, tmp_path):
    extra = tmp_path / "lora.yaml"
    extra.write_text("model:\n  init_args:\n    lora:\n      r: 4\n      alpha: 8\n")
    config = _printed_config(capsys, "--config", str(extra))
    lora = config["model"]["init_args"]["lora"]
    assert lora["r"] == 4 and lora["alpha"] == 8
    assert config["model"]["init_args"]["lr"] == pytest.approx(5e-5)  # still from the first file


def test_defaults_select_sft_model_and_data_without_a_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].endswith("SFTModule")
    assert config["data"]["class_path"].endswith("SFTDataModule")
    assert config["seed_everything"] == 0


def test_bad_override_names_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.lr", "fast", "--print_config"])
    assert exit_info.value.code != 0
    assert "lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "target, options",
    [
        ("--model.help=aesl_lightning.SFTModule",
         ["--model.lr", "--model.name_or_path", "--model.loss.tau_tok", "--model.loss.name", "--model.scheduler"]),
        ("--data.help=aesl_lightning.SFTDataModule",
         ["--data.max_length", "--data.overlong", "--data.train", "--data.synthetic.max_digits"]),
    ],
)
def test_every_option_has_a_one_line_help_text(capsys, target, options):
    with pytest.raises(SystemExit):
        main(["fit", target])
    help_text = capsys.readouterr().out
    blocks = help_text.split("\n  --")
    for option in options:
        block = next((b for b in blocks if b.startswith(option.removeprefix("--") + " ")), None)
        assert block is not None, f"{option} missing from --help"
        description = block.split("(type:")[0].split("\n", 1)[-1].strip()
        assert len(description) > 10, f"{option} has no help text: {block!r}"


def test_synthetic_subcommand_writes_jsonl(tmp_path):
    out = tmp_path / "arith.jsonl"
    main(["synthetic", "--num-examples", "12", "--seed", "3", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12
    assert all(r["completion"].rstrip().endswith("\\boxed{%s}" % r["answer"]) for r in records)


def _tiny_fit(tmp_path: Path, *extra: str) -> Path:
    logs = tmp_path / "logs"
    main([
        "fit", "--config", QUICKSTART,
        "--model.name_or_path", "tiny-llama", "--model.lr", "3e-3", "--model.warmup_steps", "0",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(logs),
        "--data.synthetic.num_examples", "24", "--data.val_size", "8", "--data.batch_size", "4",
        "--data.max_length", "400",
        "--model.val_generation.max_new_tokens", "12", "--model.val_generation.num_prompts", "4",
        *extra,
    ])
    runs = sorted((logs / "quickstart").glob("version_*"))
    assert len(runs) == 1
    return runs[0]


def test_tiny_end_to_end_fit_logs_checkpoints_and_exports(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from aesl_lightning.infra.models import load_tokenizer

    run = _tiny_fit(tmp_path)
    printed = capsys.readouterr().out
    assert f"TensorBoard logs : {run}" in printed and "Hugging Face model" in printed

    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ["train/loss", "train/lr", "train/token_accuracy", "train/token_entropy", "val/loss"]:
        assert tag in scalars, tag
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # lr 3e-3 on 24 examples: the loss must go down

    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()

    export = run / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = load_tokenizer(str(export))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    # the `export` subcommand rebuilds the module from the checkpoint and gives the same weights
    again = tmp_path / "exported"
    main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(again)])
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    run = _tiny_fit(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and state["aesl_lightning"]["module_class"] == "aesl_lightning.modules.sft.SFTModule"
    assert state["lr_schedulers"] and state["optimizer_states"]
    main([
        "fit", "--config", QUICKSTART, "--model.name_or_path", "tiny-llama", "--trainer.max_steps", "8",
        "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "resumed"),
        "--data.synthetic.num_examples", "24", "--data.val_size", "8", "--data.batch_size", "4",
        "--data.max_length", "400", "--ckpt_path", str(ckpt),
        "--model.val_generation.max_new_tokens", "12", "--model.val_generation.num_prompts", "4",
    ])
    last = next((tmp_path / "resumed").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 8

    # `--ckpt_path last` in the same log folder: the newest last.ckpt of the run's versions, here version_0's
    main([
        "fit", "--config", QUICKSTART, "--model.name_or_path", "tiny-llama", "--trainer.max_steps", "9",
        "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--data.synthetic.num_examples", "24", "--data.val_size", "8", "--data.batch_size", "4",
        "--data.max_length", "400", "--ckpt_path", "last",
        "--model.val_generation.max_new_tokens", "12", "--model.val_generation.num_prompts", "4",
    ])
    resumed = run.parent / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 9  # 6 + 3, not 9 from scratch


def test_ckpt_path_last_without_a_checkpoint_stops_with_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.name_or_path", "tiny-llama", "--trainer.max_steps", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path last: no last.ckpt in" in err and str(tmp_path / "logs") in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_export_refuses_a_foreign_checkpoint(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not written by aesl-lightning"):
        main(["export", "--ckpt", str(foreign), "--out", str(tmp_path / "out")])


def test_module_entry_point_runs_as_a_process(tmp_path):
    out = tmp_path / "a.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "aesl_lightning", "synthetic", "--num-examples", "3", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 3


def _lightning_cli_configs() -> list[Path]:
    """The experiment configs meant for `python -m aesl_lightning fit` (a `trainer` section); other YAML files in
    experiments/ configure their own drivers (e.g. real_study.yaml for real_study.py)."""
    return [p for p in sorted((ROOT / "experiments").glob("*.yaml")) if "trainer" in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("config", _lightning_cli_configs(), ids=lambda p: p.name)
def test_every_experiment_config_parses(capsys, config):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0), capsys.readouterr().err
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["model"]["class_path"].startswith("aesl_lightning.")
    assert parsed["trainer"]["logger"]["init_args"]["save_dir"] == "lightning_logs"


# ----------------------------------------------------------------------------------------------------
# Fail fast and clearly


def _without_logging_errors(err: str) -> str:
    # In-process runs only: a logging handler created under an earlier test's capture writes to its closed stream.
    return re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.DOTALL)


def _fit_error(capsys, monkeypatch, *args) -> str:
    """Run `fit` expecting a configuration error; the model must not be built. Returns stderr."""
    from aesl_lightning.modules import lm

    monkeypatch.setattr(lm.CausalLMModule, "__init__", lambda *a, **k: pytest.fail("the model was built first"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--trainer.max_steps", "1", "--trainer.logger", "false", *args])
    err = _without_logging_errors(capsys.readouterr().err)
    assert exit_info.value.code == 2
    assert "Traceback" not in err and "Namespace(" not in err
    return err


def test_a_broken_data_file_is_reported_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 5}\n')
    err = _fit_error(capsys, monkeypatch, "--model.name_or_path", str(tmp_path / "no-such-model"), "--data.train", str(bad))
    assert f"error: data.train: {bad}:2: missing field 'completion'" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = _fit_error(capsys, monkeypatch, "--data.train", str(empty))
    assert f"data.train: {empty}: no examples" in err
    err = _fit_error(capsys, monkeypatch, "--data.train", "synthetic", "--data.val", str(tmp_path / "missing.jsonl"))
    assert "data.val:" in err and "file not found" in err


def test_a_missing_model_folder_says_the_path_does_not_exist(tmp_path, capsys, monkeypatch):
    err = _fit_error(capsys, monkeypatch, "--model.name_or_path", str(tmp_path / "checkpoints" / "model"))
    assert f"model.name_or_path: model path '{tmp_path / 'checkpoints' / 'model'}' does not exist" in err
    assert f"nearest existing folder is '{tmp_path}'" in err and "Repo id" not in err


def test_a_bad_config_value_is_one_clean_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.name_or_path", "tiny-llama", "--model.lr", "-1", "--trainer.max_steps", "1",
              "--trainer.logger", "false"])
    err = _without_logging_errors(capsys.readouterr().err)
    assert exit_info.value.code == 2
    assert err.splitlines()[0] == "error: model.lr must be positive, got -1.0"
    assert "Traceback" not in err and "Namespace(" not in err and "Union subtypes" not in err


def test_the_command_line_prints_the_data_error_alone_and_fast(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 5}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "aesl_lightning", "fit", "--model.name_or_path", str(tmp_path / "no-model"),
         "--data.train", str(bad), "--trainer.logger", "false"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-2] == f"error: data.train: {bad}:2: missing field 'completion'; a prompt-completion record needs both 'prompt' and 'completion'"
    assert "Traceback" not in result.stderr and "Namespace(" not in result.stderr
