"""Vectorised self-BLEU (`self_bleu_batch`) vs the NLTK reference loop: equal values, median times, speed-up.

    python benchmarks/bench_self_bleu.py                       # 64 prompts x 16 samples x 128 tokens
    python benchmarks/bench_self_bleu.py --json out.json       # {"setting", "summary", "raw"} for run.py

Reference: for each prompt and each sample i, NLTK's
`sentence_bleu(others, sample_i, weights=(0.25,)*4, smoothing_function=SmoothingFunction().method1)`,
averaged over samples. Both sides get the same token-id lists (the reference's input is prepared outside its
timing); the vectorised side is also timed on 1-D int64 tensors, the form generation hands back.
Cases: `random` (uniform ids from a small vocabulary, so short n-grams recur by chance) and `repetitive`
(every sample of a prompt copies a shared template with 20% of the tokens resampled, and half of them end in
a loop of one 4-token phrase: the low-diversity regime self-BLEU is meant to detect).
Time: median over `--repeats` calls of the vectorised path and `--nltk-repeats` calls of the loop, after one
warm-up call each, interleaved. nltk is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aesl_lightning.metrics import self_bleu_batch  # noqa: E402


def make_groups(case: str, args: argparse.Namespace) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.samples, args.tokens)
    groups = []
    for _ in range(args.prompts):
        if case == "random":
            samples = torch.randint(0, args.vocab, shape, generator=gen)
        else:
            template = torch.randint(0, args.vocab, (args.tokens,), generator=gen).expand(shape).clone()
            resample = torch.rand(shape, generator=gen) < 0.2
            samples = torch.where(resample, torch.randint(0, args.vocab, shape, generator=gen), template)
            phrase = torch.randint(0, args.vocab, (4,), generator=gen)
            loop_from = args.tokens // 2
            samples[: args.samples // 2, loop_from:] = phrase.repeat(math.ceil((args.tokens - loop_from) / 4))[: args.tokens - loop_from]
        groups.append(list(samples.unbind(0)))
    return groups


def nltk_self_bleu(groups: list[list[list[int]]]) -> list[float]:
    smooth = SmoothingFunction().method1
    scores = []
    for samples in groups:
        per_sample = [
            sentence_bleu(samples[:i] + samples[i + 1 :], hyp, weights=(0.25,) * 4, smoothing_function=smooth)
            for i, hyp in enumerate(samples)
        ]
        scores.append(sum(per_sample) / len(per_sample))
    return scores


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="prompts (groups)")
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt (k)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--vocab", type=int, default=200, help="token ids are drawn from [0, vocab)")
    parser.add_argument("--repeats", type=int, default=11, help="timed calls of the vectorised path")
    parser.add_argument("--nltk-repeats", type=int, default=3, help="timed calls of the NLTK loop")
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")
    args = parser.parse_args()
    raw: dict = {}

    rows = []
    for case in ("random", "repetitive"):
        tensors = make_groups(case, args)
        lists = [[s.tolist() for s in g] for g in tensors]
        reference = nltk_self_bleu(lists)  # warm-up and the values to match
        ours_lists, ours_tensors = self_bleu_batch(lists), self_bleu_batch(tensors)
        diff = max(max(abs(a - b) for a, b in zip(reference, ours_lists)), max(abs(a - b) for a, b in zip(reference, ours_tensors)))
        assert diff <= 1e-6, f"{case}: self_bleu_batch differs from NLTK by {diff:.3g}"
        times = {"nltk": [], "lists": [], "tensors": []}
        for r in range(max(args.repeats, args.nltk_repeats)):
            if r < args.nltk_repeats:
                times["nltk"].append(timed(nltk_self_bleu, lists)[0])
            if r < args.repeats:
                times["lists"].append(timed(self_bleu_batch, lists)[0])
                times["tensors"].append(timed(self_bleu_batch, tensors)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((case, statistics.fmean(reference), diff, med))
        raw[case] = {"seconds": times, "self_bleu": statistics.fmean(reference), "max_abs_diff": diff}
        print(
            f"{case:>10}: self-BLEU {statistics.fmean(reference):.4f}  max |diff| {diff:.2e}  "
            f"NLTK {med['nltk'] * 1e3:.0f} ms  ours(lists) {med['lists'] * 1e3:.1f} ms  ours(tensors) {med['tensors'] * 1e3:.1f} ms  "
            f"speed-up {med['nltk'] / med['lists']:.0f}x / {med['nltk'] / med['tensors']:.0f}x"
        )

    table = [
        "| case | mean self-BLEU | max abs diff vs NLTK | NLTK loop median (ms) | self_bleu_batch, lists (ms) | self_bleu_batch, tensors (ms) | speed-up (lists / tensors) |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, mean, diff, med in rows:
        table.append(
            f"| {case} | {mean:.4f} | {diff:.1e} | {med['nltk'] * 1e3:.0f} | {med['lists'] * 1e3:.1f} | {med['tensors'] * 1e3:.1f} "
            f"| {med['nltk'] / med['lists']:.0f}x / {med['nltk'] / med['tensors']:.0f}x |"
        )
    print("\n".join(table))
    if args.json:
        summary = {}
        for case, mean, diff, med in rows:
            summary.update({f"{case}_nltk_ms": med["nltk"] * 1e3, f"{case}_ours_lists_ms": med["lists"] * 1e3,
                            f"{case}_ours_tensors_ms": med["tensors"] * 1e3, f"{case}_speedup_lists": med["nltk"] / med["lists"],
                            f"{case}_speedup_tensors": med["nltk"] / med["tensors"], f"{case}_max_abs_diff": diff})
        setting = {"prompts": args.prompts, "samples": args.samples, "tokens": args.tokens, "vocab": args.vocab,
                   "repeats": args.repeats, "nltk_repeats": args.nltk_repeats, "torch_threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"setting": setting, "summary": summary, "raw": raw}, indent=1) + "\n")


if __name__ == "__main__":
    main()
