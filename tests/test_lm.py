"""The shared module pieces: learning-rate schedule and optimiser parameter groups."""

import math

import pytest
import torch

from aesl_lightning.modules.lm import warmup_decay_factor


def test_warmup_is_linear_from_zero_to_one():
    factors = [warmup_decay_factor(s, 4, 20, "cosine", 0.1) for s in range(4)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_decay_reaches_min_ratio_at_the_end_and_stays(scheduler):
    assert warmup_decay_factor(4, 4, 20, scheduler, 0.1) == pytest.approx(1.0)
    assert warmup_decay_factor(20, 4, 20, scheduler, 0.1) == pytest.approx(0.1)
    assert warmup_decay_factor(50, 4, 20, scheduler, 0.1) == pytest.approx(0.1)


def test_cosine_midpoint_and_linear_midpoint():
    # 8 decay steps after 2 warm-up steps: halfway is step 6.
    assert warmup_decay_factor(6, 2, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_decay_factor(6, 2, 10, "linear", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_constant_schedule_and_unknown_name():
    assert warmup_decay_factor(100, 0, 10, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="scheduler"):
        warmup_decay_factor(5, 0, 10, "exponential", 0.1)


def test_optimizer_decays_matrices_only_and_schedule_is_stepwise():
    from aesl_lightning.modules.sft import SFTModule

    module = SFTModule("tiny-llama", lr=1e-3, weight_decay=0.1, warmup_steps=0, scheduler="constant")
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert config["lr_scheduler"]["interval"] == "step"
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, param in module.model.named_parameters():
        assert (id(param) in decayed) == (param.ndim >= 2), name
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == sum(1 for p in module.model.parameters() if p.requires_grad)


def test_bad_hyperparameters_name_the_field():
    from aesl_lightning.modules.sft import SFTModule

    with pytest.raises(ValueError, match="model.lr"):
        SFTModule("tiny-llama", lr=0.0)
    with pytest.raises(ValueError, match="model.min_lr_ratio"):
        SFTModule("tiny-llama", min_lr_ratio=2.0)


def test_forward_returns_vocab_logits():
    from aesl_lightning.modules.sft import SFTModule

    module = SFTModule("tiny-qwen2")
    ids = torch.randint(0, len(module.tokenizer), (2, 7))
    assert module(ids).shape == (2, 7, module.model.config.vocab_size)


def test_sharded_load_on_one_device_equals_the_ordinary_load(tmp_path):
    """sharded_load builds the model on the meta device (no weights in __init__); configure_model loads them, and
    the first training steps are those of an ordinary module, tied embeddings still tied."""
    import lightning as L

    from aesl_lightning.data import SFTDataModule
    from aesl_lightning.data.synthetic import ArithmeticConfig
    from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

    def fit(sharded_load):
        L.seed_everything(0)
        module = SFTModule("tiny-llama", lr=1e-2, sharded_load=sharded_load,
                           val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False))
        if sharded_load:
            assert {p.device.type for p in module.model.parameters()} == {"meta"}
        data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=12, seed=1, max_steps=1),
                             val_size=4, batch_size=4, max_length=400)
        L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=tmp_path).fit(module, data)
        return module.model

    ordinary, meta = fit(False), fit(True)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    for (name, a), (_, b) in zip(ordinary.state_dict().items(), meta.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(ordinary.model.embed_tokens.weight, SFTModule("tiny-llama").model.model.embed_tokens.weight)
