"""Turning normalised examples into token ids, and padding them into batches.

SFT contract (`encode_sft`): `labels[i] == input_ids[i]` on completion tokens and `-100` on prompt tokens
(and, after `collate_sft`, on padding), so the loss is computed on the completion only.

- With a chat template: `prompt_ids = apply_chat_template(prompt_messages, add_generation_prompt=True)` and
  `full_ids = apply_chat_template(prompt_messages + [assistant completion])`; `prompt_ids` must be a prefix
  of `full_ids` (otherwise the template rewrites earlier turns and the masking would be wrong: an error).
  The sequence ends at the end-of-turn token (the tokenizer's EOS, `<|im_end|>` for ChatML), which is
  labelled so the model learns to stop; whatever the template writes after it (ChatML's `"\\n"`) is
  dropped, since generation stops at EOS and never sees it. A template that emits no EOS after the reply
  gets one appended.
- Without a chat template: `tokens(prompt) + tokens(completion) + [eos]` (prompt with the tokenizer's
  special tokens, e.g. BOS); conversational examples need a chat template.

A plain-text prompt becomes `[{"role": "user", "content": prompt}]`, preceded by `{"role": "system",
"content": system_prompt}` when a system prompt is given (and the conversation has none).
Over-long examples are never truncated: `overlong="drop"` skips and counts them, `"error"` raises.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from aesl_lightning.data.formats import Messages, PromptExample, SFTExample

IGNORE_INDEX = -100
Overlong = Literal["drop", "error"]


@dataclass(frozen=True)
class EncodedSFT:
    """Token ids of one SFT example; `labels` is `IGNORE_INDEX` on the prompt (`prompt_length` tokens)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    source: str


@dataclass(frozen=True)
class EncodedPrompt:
    """Prompt ids (ending with the generation prompt) of one example, with its answer and other columns."""

    input_ids: list[int]
    prompt: str | Messages
    answer: str | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(prompt: str | Messages, system_prompt: str | None = None) -> Messages:
    """The prompt as chat messages: text becomes one user turn; `system_prompt` leads unless a system turn exists."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


CHAT_TEMPLATE_SECONDS = 5.0
"""Time limit of one chat-template rendering. A template is code from the model's folder (jinja, sandboxed by
transformers against escapes but not against runaway loops); a normal one renders in milliseconds."""


class ChatTemplateTimeout(ValueError):
    """A chat template did not finish rendering within its time limit."""


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise `ChatTemplateTimeout` in the Python code this thread runs inside the block once `seconds` have passed.

    Checked by a trace function (every 256th event looks at the clock) on every call, and on every line of the
    code jinja compiles a template to (`<template>`): a template's loops are stopped wherever they are, while the
    library code around it runs untraced. A single long C-level operation is not interrupted until it returns.
    The previous trace function (a debugger, coverage) is restored after the block."""
    deadline, calls = time.monotonic() + seconds, [0]

    def trace(frame, event, arg):
        calls[0] += 1
        if calls[0] % 256 == 0 and time.monotonic() > deadline:
            raise ChatTemplateTimeout(f"{what} did not finish within {seconds:g} s")
        return trace if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool,
                  source: str = "chat template") -> list[int]:
    try:
        with time_limit(CHAT_TEMPLATE_SECONDS, "the tokenizer's chat template"):
            out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                return_dict=False)
    except ChatTemplateTimeout as err:
        raise ChatTemplateTimeout(f"{source}: {err} (a template with a runaway loop?); fix or replace the "
                                  "tokenizer's chat_template") from None
    # Some tokenizer versions still return a BatchEncoding despite return_dict=False.
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def _plain_prompt(prompt: str | Messages, system_prompt: str | None, source: str) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"{source}: a conversational example needs a tokenizer with a chat template, and this tokenizer has none")
    return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, system_prompt: str | None = None, source: str = "prompt"
) -> list[int]:
    """Ids to generate from: the chat-templated prompt ending with the generation prompt (or the plain prompt)."""
    if has_chat_template(tokenizer):
        return _template_ids(tokenizer, chat_messages(prompt, system_prompt), add_generation_prompt=True, source=source)
    return list(tokenizer(_plain_prompt(prompt, system_prompt, source))["input_ids"])


def encode_sft(tokenizer: PreTrainedTokenizerBase, example: SFTExample, system_prompt: str | None = None) -> EncodedSFT:
    """`input_ids` and `labels` of one example (contract in the module docstring)."""
    eos = tokenizer.eos_token_id
    if has_chat_template(tokenizer):
        messages = chat_messages(example.prompt, system_prompt)
        prompt_ids = _template_ids(tokenizer, messages, add_generation_prompt=True, source=example.source)
        full_ids = _template_ids(tokenizer, messages + [{"role": "assistant", "content": example.completion}], add_generation_prompt=False,
                                 source=example.source)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"{example.source}: the chat template's prompt (with generation prompt, {len(prompt_ids)} tokens) is not a prefix of "
                "the templated conversation, so prompt tokens cannot be masked; the template rewrites earlier turns"
            )
        completion_ids = full_ids[len(prompt_ids) :]
        if eos is not None and eos in completion_ids:
            last = len(completion_ids) - 1 - completion_ids[::-1].index(eos)
            completion_ids = completion_ids[: last + 1]
        elif eos is not None:
            completion_ids = completion_ids + [eos]
    else:
        prompt_ids = list(tokenizer(_plain_prompt(example.prompt, system_prompt, example.source))["input_ids"])
        completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        if eos is not None:
            completion_ids.append(eos)
    if not completion_ids:
        raise ValueError(f"{example.source}: the completion encodes to no tokens")
    return EncodedSFT(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        prompt_length=len(prompt_ids),
        source=example.source,
    )


def _fits(source: str, length: int, max_length: int, overlong: Overlong, what: str) -> bool:
    """True when the example fits; False when it is to be dropped; raises in "error" mode."""
    if length <= max_length:
        return True
    if overlong == "error":
        raise ValueError(f"{source}: {what} is {length} tokens, over the limit of {max_length}; raise the limit or use overlong='drop'")
    return False


def _check_policy(overlong: str) -> None:
    if overlong not in ("drop", "error"):
        raise ValueError(f"overlong must be 'drop' or 'error', got {overlong!r}")


def encode_sft_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SFTExample],
    max_length: int,
    overlong: Overlong = "drop",
    system_prompt: str | None = None,
) -> tuple[list[EncodedSFT], int]:
    """`(encoded, num_dropped)`: examples longer than `max_length` tokens are dropped (counted) or raise."""
    _check_policy(overlong)
    encoded, dropped = [], 0
    for example in examples:
        item = encode_sft(tokenizer, example, system_prompt)
        if _fits(example.source, len(item.input_ids), max_length, overlong, "example (prompt + completion)"):
            encoded.append(item)
        else:
            dropped += 1
    return encoded, dropped


def encode_prompt_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[PromptExample | SFTExample],
    max_length: int,
    overlong: Overlong = "drop",
    system_prompt: str | None = None,
) -> tuple[list[EncodedPrompt], int]:
    """`(encoded, num_dropped)` prompts for generation; prompts longer than `max_length` are dropped or raise.

    SFT examples are accepted too (their completion is not encoded; their answer, possibly None, is kept).
    """
    _check_policy(overlong)
    encoded, dropped = [], 0
    for example in examples:
        ids = encode_prompt(tokenizer, example.prompt, system_prompt, example.source)
        if _fits(example.source, len(ids), max_length, overlong, "prompt"):
            encoded.append(EncodedPrompt(ids, example.prompt, example.answer, example.source, dict(example.extra)))
        else:
            dropped += 1
    return encoded, dropped


# ----------------------------------------------------------------------------------------------------
# Collation


def collate_sft(batch: Sequence[EncodedSFT], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` (pad id), `labels` (`IGNORE_INDEX`) and `attention_mask` (0 on padding), all `(B, T)`."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


PROMPT_BATCH_KEYS = ("input_ids", "attention_mask", "prompt", "answer", "source")


def collate_prompts(batch: Sequence[EncodedPrompt], pad_token_id: int) -> dict[str, Any]:
    """Left-padded prompts for batched `generate`, with the other columns as per-example lists.

    Returns `input_ids` and `attention_mask` `(B, T)` (padding on the left so every prompt ends at the last
    position, where generation continues), and lists `prompt`, `answer`, `source` and every extra column
    (missing values are None), as TRL passes dataset columns to reward functions. An extra column named
    like one of `PROMPT_BATCH_KEYS` is left out.
    """
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, width - n :] = torch.tensor(item.input_ids)
        attention_mask[row, width - n :] = 1
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt": [item.prompt for item in batch],
        "answer": [item.answer for item in batch],
        "source": [item.source for item in batch],
    }
    columns = dict.fromkeys(key for item in batch for key in item.extra if key not in PROMPT_BATCH_KEYS)
    for key in columns:
        out[key] = [item.extra.get(key) for item in batch]
    return out
