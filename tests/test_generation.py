"""Batched generation: masks end at the first EOS, greedy equals an argmax loop, recorded entropy is the
model's own (temperature-1) predictive entropy at each generated position."""

import pytest
import torch

from aesl_lightning.infra.generation import SamplingConfig, completion_mask_from_ids, generate
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = load_causal_lm("tiny-llama")
    tokenizer = load_tokenizer("tiny-llama")
    return model, tokenizer


def _left_padded(tokenizer, prompts):
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


def test_completion_mask_ends_at_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, truncated = completion_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_greedy_matches_an_argmax_loop(lm):
    model, tokenizer = lm
    input_ids, mask = _left_padded(tokenizer, ["abc", "hello there"])
    out = generate(model, tokenizer, input_ids, mask, SamplingConfig(num_samples=1, temperature=0, max_new_tokens=6))
    for row in range(2):
        ids = input_ids[row][mask[row].bool()].tolist()
        expected = []
        for _ in range(6):
            nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            expected.append(nxt)
            ids.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
        got = out.completion_ids[row][out.completion_mask[row]].tolist()
        assert got == expected


def test_samples_are_grouped_per_prompt_and_entropy_is_the_models(lm):
    model, tokenizer = lm
    input_ids, mask = _left_padded(tokenizer, ["12+3=", "x"])
    sampling = SamplingConfig(num_samples=3, temperature=0.7, top_p=0.9, max_new_tokens=5)
    torch.manual_seed(1)
    out = generate(model, tokenizer, input_ids, mask, sampling, record_entropy=True)
    assert out.completion_ids.shape[0] == 6 and len(out.texts) == 6
    assert torch.equal(out.prompt_ids[0], out.prompt_ids[2]) and torch.equal(out.prompt_ids[3], input_ids[1])
    # teacher-forced entropy at the same positions, from raw (temperature 1) logits
    full = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    attn = torch.cat([out.prompt_mask, out.completion_mask.long()], dim=1)
    logits = model(full, attention_mask=attn).logits[:, out.prompt_ids.shape[1] - 1 : -1]
    expected = torch.distributions.Categorical(logits=logits).entropy() * out.completion_mask
    torch.testing.assert_close(out.entropy, expected, atol=1e-4, rtol=1e-4)


def test_right_padded_prompts_are_refused(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, tokenizer, torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), SamplingConfig(num_samples=1))


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="greedy"):
        SamplingConfig(num_samples=4, temperature=0)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_shared_prompt_prefill_equals_generates_own_expansion(arch):
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(arch), load_tokenizer(arch)
    input_ids, mask = _left_padded(tokenizer, ["abc", "hello there, how are you", "x"])
    sampling = SamplingConfig(num_samples=3, temperature=1.0, max_new_tokens=8)
    runs = {}
    for share in (False, True):
        torch.manual_seed(11)
        runs[share] = generate(model, tokenizer, input_ids, mask, sampling, record_entropy=True, share_prefill=share)
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    assert torch.equal(runs[True].completion_mask, runs[False].completion_mask)
    torch.testing.assert_close(runs[True].entropy, runs[False].entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(runs[True].prompt_ids, input_ids.repeat_interleave(3, dim=0))


def test_shared_prompt_cache_holds_each_prompts_keys_once_per_sample(lm):
    from aesl_lightning.infra.generation import shared_prompt_cache

    model, tokenizer = lm
    input_ids, mask = _left_padded(tokenizer, ["abc", "hello there"])
    cache = shared_prompt_cache(model, input_ids, mask, repeats=2)
    assert cache.get_seq_length() == input_ids.shape[1] - 1
    # the last prompt token against the shared cache predicts what a full forward of the prompt predicts
    ids, m = input_ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    positions = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        step = model(input_ids=ids[:, -1:], attention_mask=m, position_ids=positions[:, -1:], cache=cache).logits[:, -1]
        full = model(input_ids=ids, attention_mask=m, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    assert shared_prompt_cache(model, input_ids, mask, repeats=1) is None
    assert shared_prompt_cache(model, input_ids[:, -1:], mask[:, -1:], repeats=4) is None
