"""Tiny models and a character-level tokenizer that need no download.

They exist for tests, smoke runs and the CPU experiment track: every piece of the toolkit runs on them
in seconds. The tokenizer maps each printable ASCII character to one token and carries a ChatML chat
template (the same `<|im_start|>` / `<|im_end|>` markers as SmolLM2 and Qwen2.5), so the chat-template
code paths are exercised exactly as with a real instruct model.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOT_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, EOT_TOKEN, UNK_TOKEN)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TinyArch = Literal["llama", "qwen2"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus newline and tab, with a ChatML template.

    `<|im_end|>` is the end-of-sequence token (as for instruct models), `<|pad|>` pads, and any character
    outside the alphabet becomes `<|unk|>`. Vocabulary size is `len(tokenizer)` (102).
    """
    alphabet = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        chat_template=CHATML_TEMPLATE,
        padding_side="right",
    )


def tiny_config(
    arch: TinyArch = "llama",
    vocab_size: int = 102,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
    pad_token_id: int = 0,
    eos_token_id: int = 2,
) -> PretrainedConfig:
    """Config of a tiny decoder of the Llama or Qwen2 architecture (the two families the paper uses)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"tiny model architecture must be 'llama' or 'qwen2', got {arch!r}")


def tiny_model(arch: TinyArch = "llama", seed: int = 0, **config_overrides) -> PreTrainedModel:
    """A randomly initialised tiny causal LM, identical for the same `seed` (global RNG left untouched)."""
    config = tiny_config(arch, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model
