import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from aesl_lightning.infra.lora import (
    LLAMA_LINEAR_MODULES,
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    is_peft_model,
    merge_lora,
    merge_lora_state_dict,
    merged_adapters,
)
from aesl_lightning.infra.tiny import tiny_model

TOKENS = torch.tensor([[5, 17, 40, 41, 42, 60, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])


def lora_model(arch="llama", **config):
    """A tiny model with adapters whose B is non-zero, so the adapted model differs from the base."""
    model = apply_lora(tiny_model(arch, seed=0), LoRAConfig(r=4, alpha=8, dropout=0.0, **config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_only_adapter_parameters_train():
    model = apply_lora(tiny_model("llama"), LoRAConfig(r=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # "all-linear": the 7 projections of each of the 2 layers, not the LM head; r * (in + out) each.
    cfg = model.get_base_model().config
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h)) + 4 * (2 * (h + i) + (i + h))
    assert sum(p.numel() for p in trainable.values()) == cfg.num_hidden_layers * per_layer
    assert not any("lm_head" in n for n in trainable)


def test_explicit_target_modules():
    model = apply_lora(tiny_model("qwen2"), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}
    assert set(LLAMA_LINEAR_MODULES) >= adapted


def test_apply_twice_is_refused():
    model = apply_lora(tiny_model(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already carries peft adapters"):
        apply_lora(model, LoRAConfig(r=2))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_model_matches_peft_model_and_leaves_it_intact(arch):
    model = lora_model(arch)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_model(arch).eval()), atol=1e-4)  # adapters do something
    merged = merge_lora(model)
    assert not is_peft_model(merged) and type(merged).__name__.endswith("ForCausalLM")
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    # The training model still has its adapters, still trainable, and computes the same function.
    assert is_peft_model(model)
    assert any(p.requires_grad and "lora_B" in n for n, p in model.named_parameters())
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_merge_inplace_unloads_adapters():
    model = lora_model()
    expected = logits(model)
    merged = merge_lora(model, inplace=True)
    assert isinstance(merged, LlamaForCausalLM)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_merge_of_plain_model_is_identity():
    model = tiny_model()
    assert merge_lora(model) is model


def test_adapters_disabled_gives_base_logits():
    model = lora_model()
    adapted = logits(model)
    base = logits(tiny_model("llama", seed=0).eval())
    with adapters_disabled(model) as reference:
        torch.testing.assert_close(logits(reference), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), adapted, atol=0, rtol=0)


def test_adapters_disabled_refuses_plain_model():
    with pytest.raises(TypeError, match="keep a frozen copy"):
        with adapters_disabled(tiny_model()):
            pass


def test_merge_lora_state_dict_matches_merge_and_unload():
    model = lora_model()
    folded = merge_lora_state_dict(model.state_dict(), LoRAConfig(r=4, alpha=8))
    merged = merge_lora(model).state_dict()
    assert set(folded) == set(merged)
    for key, value in merged.items():
        torch.testing.assert_close(folded[key], value, atol=1e-6, rtol=0)
    # Prefixes before `base_model.model.` (e.g. a LightningModule attribute) are stripped.
    prefixed = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert set(merge_lora_state_dict(prefixed, LoRAConfig(r=4, alpha=8))) == set(merged)


def test_config_validation_and_docstring():
    with pytest.raises(ValueError, match="r must be"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        LoRAConfig(bias="some")
    assert LoRAConfig(r=8, alpha=32).scaling == 4.0
    # jsonargparse builds --help from the `Args:` section: every field needs a line there.
    args = LoRAConfig.__doc__.split("Args:")[1]
    for field in dataclasses.fields(LoRAConfig):
        assert f"{field.name}:" in args
    assert isinstance(apply_lora(tiny_model(), LoRAConfig(r=2)), PeftModel)


def test_merged_adapters_compute_the_merged_model_and_restore_the_weights_bit_for_bit():
    model = lora_model()
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    adapted = logits(model)
    expected = logits(merge_lora(model))
    with merged_adapters(model) as same:
        assert same is model
        inside = logits(model)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, saved[n])]
    assert torch.equal(inside, expected)  # the same W + (alpha / r) B A as peft's merge_and_unload
    assert changed and all("base_layer.weight" in n for n in changed)  # the adapted weights were merged...
    assert dict(model.named_parameters()) == params  # ...into the same parameter objects, now restored exactly
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model), adapted)


def test_merged_adapters_restore_after_an_exception_even_mid_merge(monkeypatch):
    from peft.tuners.lora import LoraLayer

    model = lora_model()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = logits(model)
    with pytest.raises(RuntimeError, match="inside"):
        with merged_adapters(model):
            raise RuntimeError("inside")
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    calls = []
    real = type(layers[0]).merge

    def flaky(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise RuntimeError("merge failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(layers[0]), "merge", flaky)
    with pytest.raises(RuntimeError, match="merge failed"):
        with merged_adapters(model):
            pass
    assert len(calls) == 3 and not any(layer.merged for layer in layers)
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model), adapted)


def test_merged_adapters_leave_plain_and_disabled_models_alone():
    plain = tiny_model()
    with merged_adapters(plain) as same:
        assert same is plain
    model = lora_model()
    base = logits(tiny_model("llama", seed=0).eval())
    with adapters_disabled(model), merged_adapters(model):
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
