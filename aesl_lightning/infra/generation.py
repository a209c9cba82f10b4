"""Batched sampling with the KV cache, completion masks that end at the first EOS, and free entropies.

Used by SFT validation (greedy answer accuracy, k samples per prompt for the diversity metrics) and by the
GRPO rollouts. One `generate` call serves a whole batch of left-padded prompts times `num_samples`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        num_samples: Completions per prompt (k); 1 with `temperature: 0` is greedy decoding.
        temperature: Sampling temperature; 0 means greedy (argmax) decoding.
        top_p: Nucleus sampling mass; 1.0 disables it.
        max_new_tokens: Longest completion in tokens; longer ones are cut and counted as truncated.
    """

    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("temperature 0 (greedy) gives identical samples; use num_samples 1 or temperature > 0")


@dataclass
class Generation:
    """Completions of a batch of prompts; row `i * num_samples + j` is sample j of prompt i.

    `completion_mask` is True on the completion tokens up to and including the first EOS (the tokens that
    carry log-probs and loss); `truncated` marks rows that hit `max_new_tokens` without an EOS; `entropy` is
    the model's predictive entropy (nats, temperature 1, before any sampling warper) at each generated
    position, when recorded; `sampler_logp` the sampler's log softmax(z / T)[token] of each generated token (the
    logits as the sampling pass computed them, before top-p; 0 after the first EOS), when recorded.
    """

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L], pad id after the first EOS
    completion_mask: torch.Tensor  # [N, L] bool
    truncated: torch.Tensor  # [N] bool
    texts: list[str]
    entropy: torch.Tensor | None = None  # [N, L]
    sampler_logp: torch.Tensor | None = None  # [N, L]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


class _EntropyRecorder(LogitsProcessor):
    """Records the entropy of the raw next-token distribution at every step and leaves the scores alone."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.steps.append(-(logp.exp() * logp).nan_to_num().sum(dim=-1))
        return scores


class _SampledLogProbRecorder(LogitsProcessor):
    """Records log softmax(scores / T) of each sampled token and leaves the scores alone.

    The token drawn from step k's scores is only known at step k + 1 (the last column of its input_ids), so one
    step's [N, V] log-probabilities are kept until then, never the whole [N, L, V]; `finish` picks the last one."""

    def __init__(self, temperature: float) -> None:
        self.temperature, self.steps, self.pending = temperature, [], None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor | None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, completion_ids[:, len(self.steps), None]).squeeze(1))
            self.pending = None
        return torch.stack(self.steps, dim=1) if self.steps else None


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated): mask is True up to and including the first EOS of each row; rows without an EOS
    are truncated and keep every position."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    return ~seen_before, ~is_eos.any(dim=1)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-sequence ids: the generation config's (an int or a list) plus the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return ids


def shared_prompt_cache(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        repeats: int) -> DynamicCache | None:
    """The KV cache of every prompt's first P - 1 tokens, computed once per prompt and repeated `repeats` times
    (row i * repeats + j holds prompt i), so that `generate` with the prompts repeated the same way only runs
    their last token before decoding. Sampling k completions per prompt then pays the prompt's prefill once
    instead of k times; position ids follow the attention mask exactly as `generate` numbers them.

    None (no sharing) for a single sample, a one-token prompt, or a model whose cache is not a plain
    attention cache (recurrent / linear-attention layers, custom caches)."""
    if repeats < 2 or input_ids.shape[1] < 2:
        return None
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is None or not supports() or getattr(model.config, "is_encoder_decoder", False):
        return None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if any(getattr(cache, "is_linear", None) or ()):
        return None
    head, mask = input_ids[:, :-1], attention_mask[:, :-1]
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model(input_ids=head, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(repeats)
    return cache


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    record_entropy: bool = False,
    share_prefill: bool = True,
    record_logprobs: bool = False,
) -> Generation:
    """Sample `sampling.num_samples` completions for each left-padded prompt in one batched call.

    With several samples per prompt the prompts' prefill runs once per prompt (`shared_prompt_cache`) rather
    than once per sample; `share_prefill=False` leaves it all to `generate`'s own expansion. `record_logprobs`
    keeps the sampler's log-probs of the sampled tokens (`Generation.sampler_logp`; one float32 log-softmax over
    the vocabulary per decoding step)."""
    if input_ids.shape[1] > 0 and attention_mask[:, -1].min() == 0:
        raise ValueError("prompts must be left-padded for batched generation (a row ends in padding)")
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    recorder = _EntropyRecorder() if record_entropy else None
    greedy = sampling.temperature == 0
    sampled = _SampledLogProbRecorder(1.0 if greedy else sampling.temperature) if record_logprobs else None
    processors = [p for p in (recorder, sampled) if p is not None]
    was_training = model.training
    model.eval()
    try:
        repeat = sampling.num_samples
        cache = shared_prompt_cache(model, input_ids, attention_mask, repeat) if share_prefill else None
        extra = {} if cache is None else {"cache": cache}
        sequences = model.generate(
            input_ids=input_ids if cache is None else input_ids.repeat_interleave(repeat, dim=0),
            attention_mask=attention_mask if cache is None else attention_mask.repeat_interleave(repeat, dim=0),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            num_return_sequences=1 if cache is not None else repeat,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
            use_cache=True,
            logits_processor=LogitsProcessorList(processors) if processors else None,
            **extra,
        )
    finally:
        model.train(was_training)
    prompt_len = input_ids.shape[1]
    completion_ids = sequences[:, prompt_len:]
    mask, truncated = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(~mask, pad_id)
    entropy = None
    if recorder is not None:
        entropy = torch.stack(recorder.steps, dim=1)[:, : completion_ids.shape[1]] if recorder.steps else None
        if entropy is not None:
            entropy = entropy.masked_fill(~mask, 0.0)
    sampler_logp = sampled.finish(sequences[:, prompt_len:]) if sampled is not None else None
    if sampler_logp is not None:
        sampler_logp = sampler_logp[:, : completion_ids.shape[1]].masked_fill(~mask, 0.0)
    texts = tokenizer.batch_decode(
        [row[m].tolist() for row, m in zip(completion_ids, mask)], skip_special_tokens=True
    )
    return Generation(
        prompt_ids=input_ids.repeat_interleave(repeat, dim=0),
        prompt_mask=attention_mask.repeat_interleave(repeat, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
        texts=texts,
        entropy=entropy,
        sampler_logp=sampler_logp,
    )
