import json
import os
import re

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from aesl_lightning.infra.export import (
    EXPORT_INFO_FILE,
    ExportTargetError,
    check_export_target,
    clean_stale_exports,
    export_hf,
    export_state_dict,
)
from aesl_lightning.infra.lora import LoRAConfig, apply_lora, is_peft_model
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer
from aesl_lightning.infra.tiny import char_tokenizer, tiny_model

TOKENS = torch.tensor([[5, 17, 40, 41, 42, 60, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
MESSAGES = [{"role": "user", "content": "What is 1+2?"}]


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def lora_model(arch="llama"):
    model = apply_lora(tiny_model(arch, seed=0), LoRAConfig(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def safetensors_keys(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_with_plain_transformers(tmp_path, arch):
    model, tokenizer = tiny_model(arch).eval(), char_tokenizer()
    out = export_hf(model, tokenizer, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["format"] == "full"

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)

    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    text = "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
    assert load_tokenizer(str(out))(text).input_ids == tokenizer(text).input_ids
    if arch == "llama":  # for qwen2, transformers 5 forces Qwen2Tokenizer, which drops the character pre-tokenizer
        assert reloaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert reloaded_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    )
    assert (reloaded_tokenizer.pad_token, reloaded_tokenizer.eos_token) == ("<|pad|>", "<|im_end|>")
    assert reloaded.generation_config.eos_token_id == tokenizer.eos_token_id

    prompt = reloaded_tokenizer("Hello", return_tensors="pt")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(**prompt, **kwargs)
    generated = reloaded.generate(**prompt, **kwargs)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(generated, expected)


def test_export_restores_kv_cache_flag_without_touching_the_model(tmp_path):
    model = load_causal_lm("tiny-llama", gradient_checkpointing=True)
    export_hf(model, char_tokenizer(), tmp_path / "export")
    assert model.config.use_cache is False  # the training model is unchanged
    assert json.loads((tmp_path / "export" / "config.json").read_text())["use_cache"] is True


def test_peft_model_merged_on_export(tmp_path):
    model = lora_model()
    out = export_hf(model, char_tokenizer(), tmp_path / "merged")
    assert not any("lora" in k or "base_layer" in k for k in safetensors_keys(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=0)
    assert is_peft_model(model) and any(p.requires_grad for p in model.parameters())


def test_peft_adapter_only_export(tmp_path):
    model = lora_model()
    out = export_hf(model, char_tokenizer(), tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["format"] == "peft-adapter" and "PeftModel.from_pretrained" in info["note"]
    restored = PeftModel.from_pretrained(tiny_model("llama", seed=0), out).eval()
    torch.testing.assert_close(logits(restored), logits(model), atol=1e-6, rtol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template == char_tokenizer().chat_template


def test_bf16_model_and_dtype_cast(tmp_path):
    model = tiny_model().eval()
    bf16 = tiny_model().to(torch.bfloat16).eval()
    out = export_hf(bf16, char_tokenizer(), tmp_path / "bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[k], v) for k, v in bf16.state_dict().items())

    out = export_hf(model, char_tokenizer(), tmp_path / "cast", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    assert model.dtype == torch.float32  # casting happens on the copy
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="export dtype"):
        export_hf(model, char_tokenizer(), tmp_path / "bad", dtype="int8")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_export_copies_the_model_where_it_lives_and_leaves_it_untouched(tmp_path, device):
    """The model stays on its device, in training mode, with the very same parameter tensors (objects, storage,
    values, dtype), while the export holds CPU copies equal to them; cast exports cast the copy only; the reload
    reproduces the model's logits computed on its device. (On CPU a move to the CPU would pass unseen.)"""
    model = tiny_model().to(device).train()
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    out = export_hf(model, char_tokenizer(), tmp_path / "full")
    cast = export_hf(model, char_tokenizer(), tmp_path / "cast", dtype="bfloat16")

    assert model.training and all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        same, pointer, values = before[name]
        assert p is same and p.data_ptr() == pointer and p.device.type == device and p.dtype == torch.float32, name
        assert torch.equal(p, values), name
    state = model.state_dict()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            saved = f.get_tensor(key)
            assert saved.device.type == "cpu" and torch.equal(saved, state[key].cpu()), key
    with safe_open(str(cast / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=TOKENS.to(device)).logits.cpu()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load.
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(model, path):
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    block = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied: a GGUF without output.weight means tied embeddings
            continue
        array = tensor.numpy().astype(np.float32)
        if key in top:
            name = top[key]
        else:
            parts = key.split(".")
            name = f"blk.{parts[2]}.{block['.'.join(parts[3:-1])]}.weight"
            if "q_proj" in key:
                array = _permute_for_gguf(array, config.num_attention_heads)
            elif "k_proj" in key:
                array = _permute_for_gguf(array, config.num_key_value_heads)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loaded_model_exports(tmp_path):
    original = tiny_model("llama").eval()
    write_tiny_llama_gguf(original, tmp_path / "tiny.gguf")
    from_gguf = load_causal_lm(str(tmp_path), gguf_file="tiny.gguf").eval()
    torch.testing.assert_close(logits(from_gguf), logits(original), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not serializable"):
        from_gguf.save_pretrained(tmp_path / "refused")

    out = export_hf(from_gguf, char_tokenizer(), tmp_path / "export")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded), logits(original), atol=0, rtol=0)


def test_export_state_dict_merges_gathered_peft_weights(tmp_path):
    model = lora_model()
    base_config = model.get_base_model().config
    with pytest.raises(ValueError, match="pass lora_config"):
        export_state_dict(model.state_dict(), base_config, char_tokenizer(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    out = export_state_dict(
        model.state_dict(), base_config, char_tokenizer(), tmp_path / "sd", lora_config=LoRAConfig(r=4, alpha=8)
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=0)
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["merged_lora"] is True


def test_export_state_dict_rejects_mismatched_keys(tmp_path):
    state = tiny_model().state_dict()
    del state["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        export_state_dict(state, tiny_model().config, None, tmp_path / "out")
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


class SaveFailed(RuntimeError):
    pass


def failing_tokenizer():
    """A tokenizer whose save writes part of its files and then fails, after the model is saved."""
    tokenizer = char_tokenizer()

    def save_pretrained(directory, *args, **kwargs):
        (open(os.path.join(directory, "tokenizer.json"), "w")).write("{partial")
        raise SaveFailed("disk full")

    tokenizer.save_pretrained = save_pretrained
    return tokenizer


def test_failed_export_creates_nothing(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(SaveFailed):
        export_hf(tiny_model(), failing_tokenizer(), out)
    assert not out.exists()
    assert siblings(out) == []  # the temporary directory is gone too


def test_failed_export_keeps_previous_export(tmp_path):
    out = tmp_path / "export"
    export_hf(tiny_model(seed=1), char_tokenizer(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SaveFailed):
        export_hf(tiny_model(seed=2), failing_tokenizer(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == []


def test_export_replaces_previous_export_or_keeps_it(tmp_path):
    out = tmp_path / "export"
    export_hf(tiny_model(seed=1), char_tokenizer(), out)
    second = tiny_model(seed=2).eval()
    export_hf(second, char_tokenizer(), out)  # a previous export (its marker lists its files) is replaced
    assert siblings(out) == []
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(second), atol=0, rtol=0)

    export_hf(tiny_model(seed=3), char_tokenizer(), out, overwrite=False)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(second), atol=0, rtol=0)
    assert siblings(out) == []

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        export_hf(second, char_tokenizer(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_a_file_added_to_a_previous_export_is_not_deleted_without_overwrite(tmp_path):
    out = tmp_path / "export"
    export_hf(tiny_model(seed=1), char_tokenizer(), out)
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ExportTargetError, match="notes.txt"):
        export_hf(tiny_model(seed=2), char_tokenizer(), out)
    assert (out / "notes.txt").read_text() == "my notes" and siblings(out) == []
    second = tiny_model(seed=2).eval()
    export_hf(second, char_tokenizer(), out, overwrite=True)
    assert not (out / "notes.txt").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(second), atol=0, rtol=0)


@pytest.mark.parametrize("change", ["folder", "symlink", "edited config", "nested file"])
def test_a_previous_export_modified_by_its_user_is_not_replaced_without_overwrite(tmp_path, change):
    out = tmp_path / "exports" / "export"
    export_hf(tiny_model(seed=1), char_tokenizer(), out)
    export_hf(tiny_model(seed=1), char_tokenizer(), out)  # unmodified: replaced without asking
    if change == "folder":
        (out / "my_runs").mkdir()
    elif change == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (out / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    elif change == "edited config":
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "my_note": "tuned"}))
    else:
        (out / "my_runs").mkdir()
        (out / "my_runs" / "eval.txt").write_text("mine")
    snapshot = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    config_text = (out / "config.json").read_text()
    expected = {"folder": "added my_runs (folder)", "symlink": "added link (symbolic link)",
                "edited config": "changed config.json", "nested file": "added my_runs"}[change]
    with pytest.raises(ExportTargetError, match=re.escape(expected) + ".*--overwrite"):
        export_hf(tiny_model(seed=2), char_tokenizer(), out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == snapshot
    assert (out / "config.json").read_text() == config_text and siblings(out) == []
    if change == "symlink":
        assert (tmp_path / "elsewhere").is_dir()
    export_hf(tiny_model(seed=2), char_tokenizer(), out, overwrite=True)
    assert not (out / "my_runs").exists() and not (out / "link").exists()
    assert "my_note" not in json.loads((out / "config.json").read_text())


def test_a_users_folder_is_refused_before_any_work_and_left_intact(tmp_path, monkeypatch):
    from aesl_lightning.infra import export

    out = tmp_path / "my_project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')")
    (out / "data.csv").write_text("a,b\n")
    before = sorted((p.relative_to(out).as_posix(), p.read_bytes() if p.is_file() else b"") for p in out.rglob("*"))

    def never(*args, **kwargs):
        raise AssertionError("the export did work before refusing")

    monkeypatch.setattr(export, "_cpu_state_dict", never)
    for call in (lambda: export_hf(tiny_model(), char_tokenizer(), out),
                 lambda: export_hf(lora_model(), char_tokenizer(), out, merge_lora=False),
                 lambda: export_state_dict(tiny_model().state_dict(), tiny_model().config, None, out)):
        with pytest.raises(ExportTargetError, match="not an aesl-lightning export.*data.csv.*--overwrite"):
            call()
    after = sorted((p.relative_to(out).as_posix(), p.read_bytes() if p.is_file() else b"") for p in out.rglob("*"))
    assert after == before and siblings(out) == []

    # a folder holding a forged marker that is not ours, or a symlink to a folder, is refused the same way
    (out / EXPORT_INFO_FILE).write_text('{"exported_by": "someone else"}')
    with pytest.raises(ExportTargetError):
        check_export_target(out)
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    with pytest.raises(NotADirectoryError, match="symbolic link"):
        check_export_target(link)


def test_an_empty_folder_is_used_and_overwrite_true_replaces_anything(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model = tiny_model(seed=4).eval()
    export_hf(model, char_tokenizer(), empty)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(empty)), logits(model), atol=0, rtol=0)

    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    export_hf(model, char_tokenizer(), other, overwrite=True)
    assert not (other / "x.txt").exists() and (other / "model.safetensors").is_file()
    info = json.loads((other / EXPORT_INFO_FILE).read_text())
    assert info["files"] == sorted(p.name for p in other.iterdir() if p.name != EXPORT_INFO_FILE)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exported_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_hf(tiny_model(), char_tokenizer(), tmp_path / "export")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}, {k: oct(v) for k, v in modes.items()}


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_exports_are_cleaned_and_nothing_else(tmp_path):
    out = tmp_path / "hf_model"
    dead = _dead_pid()
    killed = tmp_path / f".hf_model.tmp-{dead}-0123abcd"  # a killed export: name and marker are ours
    killed.mkdir()
    (killed / EXPORT_INFO_FILE).write_text('{"exported_by": "aesl-lightning 0.1.0", "status": "incomplete"}')
    (killed / "model.safetensors").write_bytes(b"half")
    empty = tmp_path / f".hf_model.tmp-{dead}-0123abce"  # killed right after mkdir
    empty.mkdir()
    unmarked = tmp_path / f".hf_model.tmp-{dead}-0123abcf"  # our name, but not our content
    unmarked.mkdir()
    (unmarked / "thesis.tex").write_text("mine")
    alive = tmp_path / f".hf_model.tmp-{os.getppid()}-0123abc0"  # a running process's export
    alive.mkdir()
    (alive / EXPORT_INFO_FILE).write_text('{"exported_by": "aesl-lightning 0.1.0"}')
    other_name = tmp_path / f".hf_model2.tmp-{dead}-0123abcd"
    other_name.mkdir()
    (other_name / EXPORT_INFO_FILE).write_text('{"exported_by": "aesl-lightning 0.1.0"}')
    old_swapped = tmp_path / f".hf_model.old-{dead}-0123abcd"  # killed between the renames: the only copy
    old_swapped.mkdir()
    (old_swapped / EXPORT_INFO_FILE).write_text('{"exported_by": "aesl-lightning 0.1.0"}')

    assert clean_stale_exports(out) == [killed, empty]
    assert unmarked.exists() and alive.exists() and other_name.exists() and old_swapped.exists()
    export_hf(tiny_model(), char_tokenizer(), out)
    assert not old_swapped.exists()  # once the target exists again, the moved-aside copy is stale
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["hf_model", unmarked.name, alive.name, other_name.name]
    )
