"""GRPO rollout sampling (`GRPOModule.sample` = `aesl_lightning.infra.generation.generate`, which also records the
per-token entropy and builds EOS masks) against a bare `model.generate` on the same prompts.

Both paths sample with the same seed before each call, so they draw the same completions and the same
number of tokens; throughput is generated (unpadded, up to and including EOS) tokens per second. Paths
alternate within each round; medians over rounds.

    python benchmarks/bench_rollout.py                              # SmolLM2-135M, 8 prompts x G=8, 64 tokens
    python benchmarks/bench_rollout.py --model tiny-llama --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aesl_lightning.data.synthetic import ArithmeticConfig, generate_arithmetic
from aesl_lightning.infra.generation import SamplingConfig, completion_mask_from_ids, eos_ids, generate
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer


def left_padded_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in prompts
    ]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + list(x) for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    model = load_causal_lm(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    problems = generate_arithmetic(ArithmeticConfig(num_examples=args.prompts, seed=7))
    input_ids, mask = left_padded_prompts(tokenizer, [p["prompt"] for p in problems])
    sampling = SamplingConfig(args.num_generations, 1.0, 1.0, args.max_new_tokens)
    eos = eos_ids(model, tokenizer)

    def ours() -> int:
        return int(generate(model, tokenizer, input_ids, mask, sampling).lengths.sum())

    def bare() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=None, num_return_sequences=args.num_generations,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        completion_mask, _ = completion_mask_from_ids(out[:, input_ids.shape[1]:], eos)
        return int(completion_mask.sum())

    rates: dict[str, list[float]] = {"bare": [], "ours": []}
    tokens: dict[str, list[int]] = {"bare": [], "ours": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = [("bare", bare), ("ours", ours)] if round_ % 2 == 0 else [("ours", ours), ("bare", bare)]
        for name, fn in order:
            torch.manual_seed(1000 + round_)
            start = time.perf_counter()
            n = fn()
            seconds = time.perf_counter() - start
            if round_ > 0:
                rates[name].append(n / seconds)
                tokens[name].append(n)
    print(f"model {args.model}: {args.prompts} prompts x G={args.num_generations}, up to {args.max_new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"tokens generated per round (bare / ours): {tokens['bare']} / {tokens['ours']}")
    for name in ("bare", "ours"):
        print(f"{name:>5}: median {statistics.median(rates[name]):.1f} tokens/s  ({', '.join(f'{r:.0f}' for r in rates[name])})")
    print(f"throughput ratio (ours / bare): {statistics.median(rates['ours']) / statistics.median(rates['bare']):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
