"""One SFT training step of `SFTModule` under a Lightning Trainer against a plain PyTorch loop.

Same model weights, same batches, same AdamW settings, same gradient clipping; both paths measured in one
run, interleaved in rounds so that machine noise hits both alike. Reports the median step time of each and
the throughput ratio (Lightning / plain; target >= 0.95).

    python benchmarks/bench_sft_step.py                       # SmolLM2-135M-Instruct, 4 x 128 tokens, CE
    python benchmarks/bench_sft_step.py --loss aesl --steps 6 --rounds 3
    python benchmarks/bench_sft_step.py --model tiny-llama    # seconds; for a quick check of the script
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from _timing import StepTimer  # benchmarks/ is on sys.path when run as a script
from aesl_lightning import LossConfig, SFTModule
from aesl_lightning.infra.models import load_causal_lm
from aesl_lightning.modules.evaluation import ValidationGeneration


def make_batches(vocab: int, n: int, batch: int, length: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, length), generator=generator)
        labels = ids.clone()
        labels[:, : length // 4] = -100  # a prompt that carries no loss
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return batches


def lightning_steps(model_name: str, loss: str, batches: list[dict], lr: float) -> list[float]:
    module = SFTModule(model_name, lr=lr, loss=LossConfig(name=loss), warmup_steps=0, scheduler="constant",
                       val_generation=ValidationGeneration(num_prompts=0), histogram_every_n_steps=0)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.times


def plain_steps(model_name: str, batches: list[dict], lr: float) -> list[float]:
    model = load_causal_lm(model_name)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    times = []
    for batch in batches:
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--loss", default="ce", choices=["ce", "dft", "aesl"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path per round (after 1 warm-up step)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    vocab = load_causal_lm(args.model).config.vocab_size
    batches = make_batches(vocab, args.steps + 1, args.batch, args.length)
    lightning_times, plain_times = [], []
    for round_ in range(args.rounds):
        # alternate the order so that neither path always runs on a warmer (or hotter) machine
        order = ["lightning", "plain"] if round_ % 2 == 0 else ["plain", "lightning"]
        for path in order:
            if path == "lightning":
                lightning_times += lightning_steps(args.model, args.loss, batches, 1e-5)[1:]
            else:
                plain_times += plain_steps(args.model, batches, 1e-5)[1:]
    lightning_median, plain_median = statistics.median(lightning_times), statistics.median(plain_times)
    tokens = args.batch * args.length
    print(f"model {args.model}, batch {args.batch} x {args.length} tokens, loss {args.loss} (module) vs "
          f"F.cross_entropy (plain), {len(lightning_times)} timed steps each, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{'path':<24}{'median step (s)':>16}{'tokens/s':>12}")
    print(f"{'plain PyTorch loop':<24}{plain_median:>16.3f}{tokens / plain_median:>12.1f}")
    print(f"{'SFTModule + Trainer':<24}{lightning_median:>16.3f}{tokens / lightning_median:>12.1f}")
    print("plain step times (s):", " ".join(f"{t:.2f}" for t in plain_times))
    print("module step times (s):", " ".join(f"{t:.2f}" for t in lightning_times))
    print(f"throughput ratio (SFTModule / plain): {plain_median / lightning_median:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
