"""GRPOModule in tiny Lightning runs: learning a reward, references (none, frozen copy, LoRA), mu, evaluation."""

import json

import lightning as L
import pytest
import torch

from aesl_lightning.data import PromptDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule, load_reward_funcs
from aesl_lightning.infra.lora import LoRAConfig, adapters_disabled


def high_chars(prompts, completions, **_):
    """A reward a random model can improve on: the mean code point of the completion text, in [0, 1]."""
    return [sum((ord(c) - 32) / 94 for c in text) / len(text) if text else 0.0 for text in completions]


def half_missing(prompts, completions, **_):
    return [None if i % 2 else 1.0 for i in range(len(completions))]


HIGH_CHARS = f"{__name__}.high_chars"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _module(**grpo):
    lora = grpo.pop("lora", None)
    lr = grpo.pop("lr", 1e-2)
    config = dict(num_generations=4, max_new_tokens=6, beta=0.0, reward_funcs=[HIGH_CHARS], log_completions_every_n_steps=0)
    return GRPOModule("tiny-llama", lora=lora, lr=lr, grpo=GRPOConfig(**{**config, **grpo}),
                      evaluation=GRPOEvaluation(num_samples=2, max_new_tokens=6, num_text_samples=1))


def _data(num_examples=8, batch_size=2, val_size=0, test_size=0):
    return PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=num_examples, seed=1, max_steps=1),
                            val_size=val_size, test_size=test_size, batch_size=batch_size, max_prompt_length=400)


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, log_every_n_steps=1)
    return L.Trainer(**{**defaults, **kwargs})


class _Record(L.Callback):
    def __init__(self):
        self.rewards, self.steps = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(float(trainer.callback_metrics["train/reward/mean"]))
        self.steps.append(trainer.global_step)


def _batch(module, data):
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_mean_reward_increases_on_a_tiny_model(tmp_path):
    L.seed_everything(0)
    module = _module(lr=2e-2)
    record = _Record()
    _trainer(tmp_path, max_steps=14, limit_val_batches=0, callbacks=[record]).fit(module, _data(num_examples=28))
    first, last = sum(record.rewards[:4]) / 4, sum(record.rewards[-4:]) / 4
    assert last > first + 0.1, record.rewards
    for name in ("train/rewards/high_chars/mean", "train/rewards/high_chars/std", "train/kl", "train/clip_ratio/total",
                 "train/entropy", "train/self_bleu", "train/gen_truncated", "train/pass@4", "train/accuracy"):
        assert name in module.trainer.callback_metrics, name


def test_beta_zero_loads_no_reference():
    module = _module(beta=0.0)
    assert module.reference_model is None
    rollout = module.make_rollout(_batch(module, _data()))
    assert rollout.ref_logp is None and rollout.old_logp is None


def test_beta_positive_keeps_a_frozen_reference_outside_the_module():
    module = _module(beta=0.04)
    ref = module.reference_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert all(not name.startswith("_reference") for name, _ in module.named_parameters())  # not trained, not saved
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05)
    rollout = module.make_rollout(_batch(module, _data()))
    gen = rollout.generation
    expected, _ = module.sequence_log_probs(ref, rollout.input_ids, rollout.attention_mask, gen.completion_ids)
    policy, _ = module.sequence_log_probs(module.model, rollout.input_ids, rollout.attention_mask, gen.completion_ids)
    assert torch.allclose(rollout.ref_logp, expected) and not torch.allclose(rollout.ref_logp, policy)


def test_lora_reference_is_the_adapter_disabled_model():
    module = _module(beta=0.04, lora=LoRAConfig(r=4, dropout=0.0))
    assert module.reference_model is None  # no second copy of the weights
    with torch.no_grad():  # move the adapters away from B = 0 so policy and base differ
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    module.model.eval()
    rollout = module.make_rollout(_batch(module, _data()))
    args = (rollout.input_ids, rollout.attention_mask, rollout.generation.completion_ids)
    with torch.no_grad():
        policy, _ = module.sequence_log_probs(module.model, *args)
        with adapters_disabled(module.model):
            base, _ = module.sequence_log_probs(module.model, *args)
    assert torch.allclose(rollout.ref_logp, base, atol=1e-6)
    assert (rollout.ref_logp - policy).abs().max() > 1e-3


def test_num_iterations_takes_mu_optimiser_steps_per_rollout_with_old_log_probs(tmp_path):
    module = _module(num_iterations=3)
    rollout = module.make_rollout(_batch(module, _data()))
    with torch.no_grad():
        current, _ = module.sequence_log_probs(module.model, rollout.input_ids, rollout.attention_mask,
                                               rollout.generation.completion_ids)
    assert torch.allclose(rollout.old_logp, current, atol=1e-6)

    record = _Record()
    _trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[record]).fit(module, _data())
    assert record.steps == [3, 6]  # two batches of rollouts, three optimiser steps each


def test_rewards_are_weighted_and_none_is_left_out():
    module = _module(reward_funcs=[HIGH_CHARS, f"{__name__}.half_missing"], reward_weights=[2.0, 0.5])
    scores = module.score(["p"] * 2, ["~~", "  "], [[1], [2]], {})
    assert scores[0].tolist() == [1.0, 1.0] and scores[1, 0] == 0.0 and torch.isnan(scores[1, 1])
    total = (scores * module.reward_weights).nansum(dim=1)
    assert total.tolist() == [2.5, 0.0]


def test_reward_function_errors_name_the_field():
    with pytest.raises(ValueError, match=r"grpo.reward_funcs\[0\].*no_such_module"):
        load_reward_funcs(["no_such_module.reward"])
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOConfig(reward_funcs=[HIGH_CHARS], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1)
    assert [f.__name__ for f in load_reward_funcs(GRPOConfig().reward_funcs)] == ["math_accuracy", "boxed_format"]


def test_validation_and_test_log_accuracy_pass_at_k_and_write_results(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = _module()
    data = _data(num_examples=4, val_size=2, test_size=2)
    trainer = _trainer(tmp_path, max_steps=1, val_check_interval=1, logger=CSVLogger(tmp_path, name="grpo"))
    trainer.fit(module, data)
    for name in ("val/greedy_accuracy", "val/pass@1", "val/pass@2", "val/self_bleu", "val/gen_entropy"):
        assert name in trainer.callback_metrics, name
    trainer.test(module, data)
    results = json.loads((tmp_path / "grpo" / "version_0" / "test_results.json").read_text())
    assert results["test/greedy_accuracy"] == 0.0 and 0.0 <= results["test/pass@2"] <= 1.0
    assert results["step"] == 1


def test_test_from_a_checkpoint_records_the_checkpoint_step(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = _module()
    data = _data(num_examples=4, test_size=2)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, data)
    ckpt = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = _module()
    tester = _trainer(tmp_path, logger=CSVLogger(tmp_path, name="test"))
    tester.test(fresh, data, ckpt_path=ckpt)
    results = json.loads((tmp_path / "test" / "version_0" / "test_results.json").read_text())
    assert results["step"] == 2 and results["checkpoint"] == str(ckpt)
