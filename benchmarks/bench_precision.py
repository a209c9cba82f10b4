"""fp32 vs bf16 on this CPU: a training step and sampling of SmolLM2-135M, and the machine's matmul peak.

    python benchmarks/bench_precision.py                    # batch 4 x 256 tokens, 4 prompts x 64 new tokens
    python benchmarks/bench_precision.py --quick --json out.json

Three precisions of SmolLM2-135M-Instruct (the built-in `smollm2-135m-instruct`):
- `fp32`: fp32 weights, no autocast;
- `bf16_mixed`: the same fp32 weights (and the same AdamW) under `torch.autocast("cpu", dtype=torch.bfloat16)`
  around the forward and the loss, as Lightning's `precision="bf16-mixed"` does;
- `bf16_weights`: the model loaded in bfloat16 (`load_causal_lm(dtype="bfloat16")`), its own AdamW, no autocast.

Step: one forward of `--batch` x `--seq` random token ids with `labels = input_ids` (the model's own shifted
cross-entropy), backward, AdamW (lr 1e-6), zero_grad: the model-level step, not Lightning's `SFTModule`.
Sampling: `generate` of `--prompts` prompts x exactly `--new-tokens` tokens (`min_new_tokens` = `max_new_tokens`,
so every precision samples the same number of tokens), temperature 1, in eval mode; tokens/s = tokens / seconds.
Matmul: `--matmul-size`^3 products, GFLOP/s = 2 n^3 / seconds of the fastest of 3, in fp32 and bf16: the
machine's reference peak (a CPU without avx512_bf16 / AMX has no native bf16 matmul: expect bf16 far below fp32).
Every figure is the median over `--repeats` timed repeats after one untimed warm-up, the precisions interleaved
within each repeat (the order rotating), so slow drifts of the machine hit all alike. Speed-ups are fp32 / other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer  # noqa: E402

MODEL = "smollm2-135m-instruct"
PRECISIONS = ("fp32", "bf16_mixed", "bf16_weights")


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_mixed")


def train_step(model, optimiser, ids: torch.Tensor, precision: str) -> float:
    """Seconds of one forward (with loss) + backward + AdamW step + zero_grad."""
    start = time.perf_counter()
    with autocast(precision):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def sample(model, prompt_ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int, precision: str,
           seed: int) -> tuple[float, int]:
    """(seconds, tokens sampled) of one `generate` call producing exactly `new_tokens` per prompt."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad(), autocast(precision):
        out = model.generate(input_ids=prompt_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    return time.perf_counter() - start, int(out[:, prompt_ids.shape[1]:].numel())


def matmul_gflops(n: int, dtype: torch.dtype, tries: int = 3) -> float:
    """2 n^3 / seconds of the fastest of `tries` n x n x n products, in GFLOP/s (the fastest: a peak reference);
    fewer tries once 2 s have gone (a dtype without native support can take half a minute per product)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best, spent = float("inf"), 0.0
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        spent += time.perf_counter() - start
        if spent > 2.0:
            break
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per training step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n matmul")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="batch 2 x 128, 2 prompts x 16 tokens, 1024^3, 2 repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")
    opts = parser.parse_args()
    if opts.quick:
        opts.batch, opts.seq, opts.prompts, opts.new_tokens, opts.matmul_size, opts.repeats = 2, 128, 2, 16, 1024, 2

    torch.manual_seed(opts.seed)
    tokenizer = load_tokenizer(MODEL)
    fp32 = load_causal_lm(MODEL, dtype="float32")
    bf16 = load_causal_lm(MODEL, dtype="bfloat16")
    models = {"fp32": fp32, "bf16_mixed": fp32, "bf16_weights": bf16}
    optimisers = {"fp32": torch.optim.AdamW(fp32.parameters(), lr=1e-6)}
    optimisers["bf16_mixed"] = optimisers["fp32"]  # the same weights and optimiser, under autocast
    optimisers["bf16_weights"] = torch.optim.AdamW(bf16.parameters(), lr=1e-6)
    vocab = fp32.config.vocab_size
    ids = torch.randint(0, vocab, (opts.batch, opts.seq))
    messages = [[{"role": "user", "content": f"What is {7 * i + 12} + {3 * i + 35}?"}] for i in range(opts.prompts)]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    raw: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PRECISIONS} for k in ("step_s", "sample_tokens_per_s")}
    raw["matmul_gflops"] = {"fp32": [], "bf16": []}
    for r in range(opts.repeats + 1):
        order = PRECISIONS[r % 3:] + PRECISIONS[:r % 3]
        for precision in order:
            model = models[precision].train()
            seconds = train_step(model, optimisers[precision], ids, precision)
            model.eval()
            sample_s, tokens = sample(model, enc["input_ids"], enc["attention_mask"], opts.new_tokens, pad_id, precision,
                                      opts.seed + r)
            gflops = {dtype: matmul_gflops(opts.matmul_size, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
                      for dtype in (("fp32", "bf16") if precision == order[0] else ())}
            if r == 0:
                continue  # warm-up
            raw["step_s"][precision].append(seconds)
            raw["sample_tokens_per_s"][precision].append(tokens / sample_s)
            for dtype, value in gflops.items():
                raw["matmul_gflops"][dtype].append(value)
        if r:
            print(f"repeat {r}: " + "; ".join(f"{p} step {raw['step_s'][p][-1]:.2f} s, sampling "
                                              f"{raw['sample_tokens_per_s'][p][-1]:.1f} tokens/s" for p in PRECISIONS)
                  + f"; matmul fp32 {raw['matmul_gflops']['fp32'][-1]:.0f}, bf16 {raw['matmul_gflops']['bf16'][-1]:.0f} GFLOP/s",
                  flush=True)

    med = {kind: {p: statistics.median(v) for p, v in values.items()} for kind, values in raw.items()}
    summary = {}
    for p in PRECISIONS:
        summary[f"{p}_step_s"] = med["step_s"][p]
        summary[f"{p}_sample_tokens_per_s"] = med["sample_tokens_per_s"][p]
        if p != "fp32":
            summary[f"{p}_step_speedup"] = med["step_s"]["fp32"] / med["step_s"][p]
            summary[f"{p}_sample_speedup"] = med["sample_tokens_per_s"][p] / med["sample_tokens_per_s"]["fp32"]
    summary.update(matmul_fp32_gflops=med["matmul_gflops"]["fp32"], matmul_bf16_gflops=med["matmul_gflops"]["bf16"],
                   matmul_bf16_speedup=med["matmul_gflops"]["bf16"] / med["matmul_gflops"]["fp32"])
    # the share of the machine's matmul peak each path reaches, from the linear layers' FLOPs alone (attention scores
    # and element-wise work left out, so an under-estimate): 6 N per trained token, 2 N per sampled token; fp32 against
    # the fp32 peak, the bf16 paths against the bf16 peak
    linear = sum(m.weight.numel() for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    for p in PRECISIONS:
        peak = med["matmul_gflops"]["fp32" if p == "fp32" else "bf16"] * 1e9
        summary[f"{p}_step_share_of_peak"] = 6 * linear * opts.batch * opts.seq / med["step_s"][p] / peak
        summary[f"{p}_sample_share_of_peak"] = 2 * linear * med["sample_tokens_per_s"][p] / peak
    for key, value in summary.items():
        print(f"{key:>32}: {value:.3f}")
    if opts.json:
        setting = {"model": MODEL, "step": f"[{opts.batch} x {opts.seq}] tokens, forward + backward + AdamW",
                   "sampling": f"{opts.prompts} prompts x {opts.new_tokens} new tokens, T 1", "matmul": opts.matmul_size,
                   "repeats": opts.repeats, "quick": opts.quick, "torch_threads": torch.get_num_threads(),
                   "share_of_peak": "linear-layer FLOPs only (6 N per trained token, 2 N per sampled token) over the matmul peak of the path's dtype"}
        Path(opts.json).write_text(json.dumps({"setting": setting, "summary": summary, "raw": raw}, indent=1) + "\n")


if __name__ == "__main__":
    main()
