"""SFTModule in real (tiny) Lightning runs: exact resume, validation generation, LoRA, chunked loss, accumulation."""

import lightning as L
import pytest
import torch

from aesl_lightning.data import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.lora import LoRAConfig
from aesl_lightning.maths.losses import LossConfig
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration


def _data(num_examples=16, batch_size=4, val_size=4):
    return SFTDataModule(
        train="synthetic",
        synthetic=ArithmeticConfig(num_examples=num_examples, seed=1, max_steps=1),
        val_size=val_size,
        batch_size=batch_size,
        max_length=400,
    )


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _params(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_resume_is_exact_at_an_epoch_boundary(tmp_path):
    """2 epochs straight == 1 epoch, last.ckpt, resume for the second: same weights, optimiser and schedule.

    (Epoch-based runs resume exactly; with `max_steps` Lightning restarts the interrupted epoch's data order,
    while weights, optimiser, scheduler and step are still restored.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kwargs = dict(lr=3e-3, warmup_steps=2, scheduler="cosine", val_generation=ValidationGeneration(num_prompts=0))
    L.seed_everything(0)
    straight = SFTModule("tiny-llama", **kwargs)
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(straight, _data())

    L.seed_everything(0)
    first = SFTModule("tiny-llama", **kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
                       callbacks=[_StopAfterFirstEpoch(), checkpoint])
    trainer.fit(first, _data())
    assert trainer.global_step == 4

    L.seed_everything(123)  # the resumed run must not depend on the global RNG
    resumed = SFTModule("tiny-llama", **kwargs)
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(resumed, _data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 8
    a, b = _params(straight), _params(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(a["model.embed_tokens.weight"], _params(first)["model.embed_tokens.weight"])


def test_validation_generation_logs_accuracy_diversity_and_kl(tmp_path):
    module = SFTModule("tiny-llama", lr=1e-3,
                       val_generation=ValidationGeneration(num_prompts=3, max_new_tokens=8, num_samples=3))
    trainer = _trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(module, _data())
    metrics = trainer.callback_metrics
    # a random tiny model writes no \boxed{} answer: accuracy exactly 0; every completion hits max_new_tokens or EOS
    assert metrics["val/answer_accuracy"].item() == 0.0
    assert 1 <= metrics["val/greedy_length"].item() <= 8
    assert metrics["val/pass@3"].item() == 0.0 and metrics["val/sample_accuracy"].item() == 0.0
    # near-uniform random model over 102 tokens: entropy close to log(102), samples barely overlap
    assert 3.0 < metrics["val/gen_entropy"].item() <= torch.log(torch.tensor(102.0)).item() + 1e-4
    assert 0.0 <= metrics["val/self_bleu"].item() < 0.5
    assert 0.5 < metrics["val/distinct_2"].item() <= 1.0
    # two optimiser steps at lr 1e-3 move the model a little away from its start: small, positive KL
    assert 0.0 < metrics["val/kl_to_base"].item() < 0.5
    assert "val/loss" in metrics and "val/token_entropy" in metrics


@pytest.mark.parametrize("loss", ["aesl_anchor", "aesl_drift"])
def test_base_anchored_losses_fit_and_validate_with_kl_to_base(tmp_path, loss):
    """An anchored loss logs its own `anchor_kl` beside validation's `val/kl_to_base` metric (one name each)."""
    module = SFTModule("tiny-llama", lr=1e-3, loss=LossConfig(name=loss),
                       val_generation=ValidationGeneration(num_prompts=0, kl_to_base=True))
    trainer = _trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(module, _data())
    metrics = trainer.callback_metrics
    assert 0.0 < metrics["val/kl_to_base"].item() < 0.5
    assert metrics["val/anchor_kl"].item() >= 0.0 and metrics["train/anchor_kl"].item() >= 0.0


def test_validate_before_fit_with_inference_mode(tmp_path):
    """`trainer.validate()` (the step-0 row of a curve) then `fit()` on the same module, inference mode on (default):
    the metric states reset under inference mode must not break fit's validation, and each run logs its own values."""
    module = SFTModule("tiny-llama", lr=1e-3,
                       val_generation=ValidationGeneration(num_prompts=2, max_new_tokens=6, num_samples=2))
    trainer = _trainer(tmp_path, max_steps=2, val_check_interval=2)
    data = _data()
    before = trainer.validate(module, data, verbose=False)[0]
    assert before["val/kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # the start model against itself
    trainer.fit(module, data)
    after = trainer.callback_metrics
    assert 0.0 < after["val/kl_to_base"].item() < 0.5 and after["val/greedy_length"].item() >= 1


def test_answer_accuracy_counts_correct_completions(monkeypatch):
    """Scoring path with a stubbed generator: 2 of 3 completions carry the right boxed answer."""
    import aesl_lightning.modules.evaluation as evaluation
    from aesl_lightning.infra.generation import Generation

    module = SFTModule("tiny-llama", val_generation=ValidationGeneration(num_prompts=3, num_samples=0))
    module.log_dict = lambda *a, **k: None
    answers = ["4", "9", "10"]
    texts = ["\\boxed{4}", "\\boxed{9}", "\\boxed{11}"]

    def fake_generate(model, tokenizer, ids, mask, sampling, record_entropy=False):
        n = ids.shape[0]
        return Generation(ids, mask, torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.bool),
                          torch.zeros(n, dtype=torch.bool), texts[:n])

    monkeypatch.setattr(evaluation, "generate", fake_generate)

    class _T:
        world_size = 1
        global_rank = 0
        logger = None

    module._trainer = _T()
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4, dtype=torch.long),
             "prompt": ["a", "b", "c"], "answer": answers}
    values = module.generate_on_validation_prompts([batch])
    assert values["val/answer_accuracy"] == pytest.approx(2 / 3)
    assert values["val/greedy_length"] == 2.0


def test_lora_trains_only_adapters_and_exports_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    module = SFTModule("tiny-llama", lr=1e-2, lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
                       val_generation=ValidationGeneration(num_prompts=0))
    before = {k: v.clone() for k, v in module.model.named_parameters()}
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, _data())
    for name, param in module.model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == ("lora_" in name), name
    out = module.export_hf(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 9, 11, 20]])
    module.model.eval()
    torch.testing.assert_close(merged(ids).logits, module(ids), atol=1e-5, rtol=1e-5)


def test_chunked_loss_path_gives_the_same_loss_and_gradients():
    data = _data(num_examples=8)
    module = SFTModule("tiny-qwen2", loss=LossConfig(name="aesl", tau_tok=0.5, tau_seq=0.95))
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    full = module.compute_loss(batch)
    grads_full = torch.autograd.grad(full.loss, list(module.model.parameters()), allow_unused=True)
    module.loss_config = LossConfig(name="aesl", tau_tok=0.5, tau_seq=0.95, chunk_size=7)
    chunked = module.compute_loss(batch)
    grads_chunked = torch.autograd.grad(chunked.loss, list(module.model.parameters()), allow_unused=True)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.token_logprob, full.token_logprob, rtol=1e-5, atol=1e-5)
    for g_full, g_chunked in zip(grads_full, grads_chunked):
        if g_full is not None:
            torch.testing.assert_close(g_chunked, g_full, rtol=1e-4, atol=1e-6)


def test_training_logs_aesl_gate_statistics(tmp_path):
    module = SFTModule("tiny-llama", lr=1e-3, loss=LossConfig(name="aesl", tau_tok=0.02, tau_seq=0.5),
                       val_generation=ValidationGeneration(num_prompts=0))
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(module, _data())
    metrics = trainer.callback_metrics
    for key in ["train/loss", "train/lr", "train/token_gate_mean", "train/seq_gate_mean", "train/gated_off_fraction",
                "train/token_accuracy", "train/token_entropy"]:
        assert key in metrics, key
    # a random model over a 102-token vocabulary puts p ~ 0.01 < 0.02 on most targets: the gate is mostly open
    assert 0.5 < metrics["train/token_gate_mean"].item() <= 1.0
    assert trainer.global_step == 2  # 4 batches with accumulation 2


def test_chunked_loss_refuses_heads_it_cannot_reproduce():
    module = SFTModule("tiny-llama", loss=LossConfig(name="ce", chunk_size=4), val_generation=ValidationGeneration(num_prompts=0))
    batch = {"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "labels": torch.tensor([[-100, 1, 2, 3, 4]])}
    module.compute_loss(batch)  # a plain Llama head works
    module.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        module.compute_loss(batch)


def test_validation_sampling_is_seeded_by_step_and_leaves_the_global_rng_alone(tmp_path):
    """Same (seed, step): the same samples and diversity numbers whatever the global RNG did before; another step
    samples differently; the training RNG stream is not consumed."""
    module = SFTModule("tiny-llama", val_generation=ValidationGeneration(num_prompts=4, num_samples=3, max_new_tokens=12))
    module.log_dict = lambda *a, **k: None
    data = _data()
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")

    class _T:
        world_size, global_rank, logger, global_step = 1, 0, None, 5

    module._trainer = _T()
    torch.manual_seed(123)
    first = module.seeded_generation(data.val_prompts_dataloader(4))
    after_first = torch.rand(1)
    torch.manual_seed(999)
    second = module.seeded_generation(data.val_prompts_dataloader(4))
    first.pop("val/generation_seconds"), second.pop("val/generation_seconds")
    assert first == second and "val/self_bleu" in first
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_first)  # the global stream was not advanced by validation sampling
    _T.global_step = 6
    third = module.seeded_generation(data.val_prompts_dataloader(4))
    third.pop("val/generation_seconds")
    assert third != first
