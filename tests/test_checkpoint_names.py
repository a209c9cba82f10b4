"""A checkpoint that loads with weights_only=True can still *name* code: a reward function
(`hyper_parameters.grpo.reward_funcs`) or a model class (`hyper_parameters._class_path`, which LightningCLI reads back
into its config). Export, `test --ckpt_path` and `fit --ckpt_path` import none of it unless the user's own config
names it; the module written beside the checkpoint would create a marker file if it were ever imported."""

import sys
from dataclasses import replace
from pathlib import Path

import lightning
import pytest
import torch

from aesl_lightning.cli import main
from aesl_lightning.modules.grpo import BUILTIN_REWARDS, GRPOConfig, GRPOModule
from aesl_lightning.modules.checkpoint_load import UnsafeCheckpointError

QUICKSTART = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml")


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """`evil_reward.py` (a reward function and a model class) importable from the current folder, as when
    `python -m aesl_lightning` runs where the checkpoint lies; importing it writes `imported`."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_reward.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "from aesl_lightning.modules.sft import SFTModule as Module\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("evil_reward", None)
    yield marker
    sys.modules.pop("evil_reward", None)


OLD_GRPO = "aesl_lightning.grpo.GRPOModule"  # the class's name in checkpoints written before the sub-packages


def grpo_checkpoint(path, reward_funcs, module_class=OLD_GRPO, **hparams):
    grpo = GRPOConfig(num_generations=2, max_new_tokens=4, beta=0.0)
    module = GRPOModule("tiny-llama", grpo=grpo)
    torch.save({
        "aesl_lightning": {"module_class": module_class},
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": {**module.hparams, "grpo": replace(grpo, reward_funcs=reward_funcs), **hparams},
    }, path)
    return path


def test_export_of_a_checkpoint_naming_a_reward_beside_it_imports_nothing(tmp_path, evil, caplog):
    ckpt = grpo_checkpoint(tmp_path / "model.ckpt", [*BUILTIN_REWARDS, "evil_reward.f"])
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").is_file()  # export does not need the reward: it goes on
    assert not evil.exists() and "evil_reward" not in sys.modules
    assert "'evil_reward.f' comes from checkpoint" in caplog.text and "not imported" in caplog.text


def test_load_from_checkpoint_keeps_an_unallowed_reward_as_a_name_that_refuses_to_run(tmp_path, evil):
    ckpt = grpo_checkpoint(tmp_path / "model.ckpt", [*BUILTIN_REWARDS, "evil_reward:f"])
    module = GRPOModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert module.reward_names == ["math_accuracy", "boxed_format", "f"]
    with pytest.raises(PermissionError, match=r"'evil_reward:f' was named by checkpoint .*model.ckpt and not imported"):
        module.reward_funcs[2](prompts=["p"], completions=["c"])
    assert not evil.exists()

    # the caller's explicit allow: named in the arguments, it is imported and used
    allowed = GRPOConfig(num_generations=2, max_new_tokens=4, beta=0.0, reward_funcs=[*BUILTIN_REWARDS, "evil_reward.f"])
    module = GRPOModule.load_from_checkpoint(ckpt, map_location="cpu", grpo=allowed)
    assert module.reward_funcs[2](prompts=["p"], completions=["c"]) == [1.0] and evil.exists()


def _cli(capsys, subcommand, ckpt, *extra):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", QUICKSTART, "--model.name_or_path", "tiny-llama", "--trainer.max_steps", "1",
              "--trainer.logger", "false", "--ckpt_path", str(ckpt), *extra])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_cli_refuses_a_checkpoints_reward_function_and_model_class(tmp_path, evil, capsys, subcommand):
    ckpt = grpo_checkpoint(tmp_path / "model.ckpt", [*BUILTIN_REWARDS, "evil_reward.f"],
                           _class_path="aesl_lightning.modules.grpo.GRPOModule")
    err = _cli(capsys, subcommand, ckpt)
    assert "model.ckpt: hyper_parameters.grpo.reward_funcs names 'evil_reward.f'" in err
    assert not evil.exists()

    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "evil_reward.Module", "name_or_path": "tiny-llama"}},
               tmp_path / "class.ckpt")
    err = _cli(capsys, subcommand, tmp_path / "class.ckpt")
    assert "class.ckpt: hyper_parameters._class_path names 'evil_reward.Module'" in err and "--model" in err
    assert not evil.exists() and "evil_reward" not in sys.modules


def test_names_in_the_users_config_are_honoured(tmp_path, evil):
    from aesl_lightning.cli import checked_checkpoint_hparams

    ckpt = grpo_checkpoint(tmp_path / "model.ckpt", [*BUILTIN_REWARDS, "evil_reward.f"],
                           _class_path="evil_reward.Module", trust_remote_code=True)
    user = {"class_path": "evil_reward.Module",
            "init_args": {"trust_remote_code": True, "grpo": {"reward_funcs": ["evil_reward:f"]}}}
    hparams = checked_checkpoint_hparams(ckpt, user)
    assert hparams["_class_path"] == "evil_reward.Module" and hparams["grpo"].reward_funcs[-1] == "evil_reward.f"
    assert not evil.exists()  # checking the names imports nothing either
    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code is true"):
        checked_checkpoint_hparams(ckpt, {**user, "init_args": {"grpo": {"reward_funcs": ["evil_reward.f"]}}})
    # the toolkit's own classes are always allowed, under their names now and before the sub-packages
    for own in ("aesl_lightning.modules.grpo.GRPOModule", OLD_GRPO, "aesl_lightning.sft.SFTModule"):
        torch.save({"hyper_parameters": {"_class_path": own}}, tmp_path / "own.ckpt")
        assert checked_checkpoint_hparams(tmp_path / "own.ckpt", {"class_path": "aesl_lightning.SFTModule"})


def test_a_nested_class_path_or_a_missing_toolkit_module_is_refused_with_the_field(tmp_path, evil):
    from aesl_lightning.cli import checked_checkpoint_hparams

    user = {"class_path": "aesl_lightning.SFTModule", "init_args": {}}
    torch.save({"hyper_parameters": {"lora": {"class_path": "evil_reward.Module", "init_args": {}}}}, tmp_path / "a.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"a.ckpt: hyper_parameters.lora.class_path names a class"):
        checked_checkpoint_hparams(tmp_path / "a.ckpt", user)
    torch.save({"hyper_parameters": {"_class_path": "aesl_lightning.no_such_module.Module"}}, tmp_path / "b.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"b.ckpt: hyper_parameters._class_path names 'aesl_lightning.no_such"):
        checked_checkpoint_hparams(tmp_path / "b.ckpt", user)
    assert not evil.exists()


OLD_REWARDS = ["aesl_lightning.rewards.math_accuracy", "aesl_lightning.rewards.boxed_format"]


def test_the_builtin_rewards_under_their_old_names_are_builtins(tmp_path, evil):
    from aesl_lightning.cli import checked_checkpoint_hparams
    from aesl_lightning.scoring.rewards import boxed_format, math_accuracy

    ckpt = grpo_checkpoint(tmp_path / "model.ckpt", OLD_REWARDS, module_class="aesl_lightning.modules.grpo.GRPOModule")
    module = GRPOModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert module.reward_funcs == [math_accuracy, boxed_format]  # imported: not names that refuse to run
    assert checked_checkpoint_hparams(ckpt, {"class_path": "aesl_lightning.SFTModule"})["grpo"].reward_funcs == OLD_REWARDS

    # anything else under the old module name, or a look-alike of it, is still a checkpoint's name, not a built-in
    for name in ("aesl_lightning.rewards.extract_boxed", "aesl_lightning.rewardsx.math_accuracy"):
        ckpt = grpo_checkpoint(tmp_path / "other.ckpt", [*OLD_REWARDS, name])
        with pytest.raises(UnsafeCheckpointError, match=r"reward_funcs names 'aesl_lightning\..*', which is neither"):
            checked_checkpoint_hparams(ckpt, {"class_path": "aesl_lightning.SFTModule"})
        module = GRPOModule.load_from_checkpoint(ckpt, map_location="cpu")
        with pytest.raises(PermissionError, match="was named by checkpoint"):
            module.reward_funcs[2](prompts=["p"], completions=["c"])
    assert not evil.exists()


def test_a_config_class_pickled_under_its_old_module_name_loads_safely(tmp_path):
    """Checkpoints written before the sub-packages pickle LossConfig as aesl_lightning.losses.LossConfig."""
    from aesl_lightning.maths.loss_config import LossConfig
    from aesl_lightning.modules.checkpoint_load import checkpoint_class_names, load_checkpoint

    assert checkpoint_class_names(LossConfig) == ["aesl_lightning.maths.loss_config.LossConfig",
                                                  "aesl_lightning.losses.LossConfig"]
    try:
        LossConfig.__module__ = "aesl_lightning.losses"
        torch.save({"hyper_parameters": {"loss": LossConfig(name="dft", tau_tok=0.7)}}, tmp_path / "old.ckpt")
    finally:
        LossConfig.__module__ = "aesl_lightning.maths.loss_config"
    assert b"aesl_lightning.losses" in (tmp_path / "old.ckpt").read_bytes()
    assert load_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]["loss"] == LossConfig(name="dft", tau_tok=0.7)
