"""SFT throughput of `SFTModule` under a Lightning Trainer against TRL's `SFTTrainer`, same settings.

Both sides train SmolLM2-135M-Instruct (the built-in `smollm2-135m-instruct`; TRL loads its converted
Hugging Face folder, `aesl_lightning.infra.models.smollm2_cache_dir()`, as model and tokenizer) on the same fixed
list of prompt/completion examples: the first `--batch x --steps` problems of the built-in cold-start split
(`aesl_lightning.data.word_problems`, split "coldstart"), in that order (no shuffling on either side), one
user turn and one assistant reply under the model's chat template, so that every step sees the same examples.

Same training on both sides: fp32 on CPU, `--batch` examples per step (no gradient accumulation), dynamic
right padding to the longest example of the batch, max length `--max-length` (no packing, no padding-free),
plain cross-entropy on completion tokens only (ours: `LossConfig(name="ce")`; TRL: `loss_type="nll"`,
`completion_only_loss=True`), torch AdamW (TRL: `optim="adamw_torch"`) with the same lr and betas, weight
decay 0, constant schedule without warm-up, gradient clipping at 1.0 (ours: `Trainer(gradient_clip_val=1.0)`),
gradient checkpointing off (TRL's `SFTConfig` defaults it on: `activation_checkpointing=False` here). Ours
runs with validation, generation, update norms, histograms and the gate check off; TRL with logging, saving and
evaluation off.

Each step is timed by a callback (Lightning: `on_train_batch_start` -> `on_train_batch_end`; TRL:
`on_step_begin` -> `on_step_end`; the batch is already collated at the start on both sides), and its
completion tokens are counted on the batch each side actually trains on (labels != -100). Throughput =
tokens / seconds of each step; reported: the median over the kept steps (the first `--drop-first` of each
run dropped as warm-up), the ratio ours / TRL (target >= 1.0), and each side's peak memory (ru_maxrss of
its own process). Each side runs in a fresh subprocess; the order alternates over `--rounds`.

TRL data (`--trl-data`): "tokenized" (default) hands TRL the toolkit's own encoding of the examples (input
ids and labels from `aesl_lightning.data.encode`), so both sides train on identical tensors and count the same
tokens. "conversational" hands TRL the conversational prompt/completion records
(`{"prompt": [user turn], "completion": [assistant turn]}`) to tokenize itself: TRL then also labels what the
chat template writes after `<|im_end|>` (ChatML's "\\n"), which the toolkit drops (generation stops at EOS),
so each example has one more completion token and one more position on TRL's side (~3% more tokens at these
lengths, for ~1% more compute: a bias in TRL's favour, and the >2% token-mismatch warning fires).

TRL is used by this script only (never by the package); everything runs offline:

    python benchmarks/bench_sft_vs_trl.py                                   # 8 x 6 steps, first dropped
    python benchmarks/bench_sft_vs_trl.py --rounds 3 --competing-load       # beside one busy torch core
    python benchmarks/bench_sft_vs_trl.py --steps 2 --drop-first 1 --batch 2   # quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

MODEL = "smollm2-135m-instruct"
LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
TOKEN_TOLERANCE = 0.02  # warn when the two sides' completion tokens per step differ by more than this


def records(opts) -> list[dict]:
    """The fixed examples: the first batch x steps cold-start word problems (prompt, completion, answer)."""
    from aesl_lightning.data.word_problems import EASY, generate_split

    rows = generate_split("coldstart", opts.batch * opts.steps, EASY, opts.data_seed)
    return [{"prompt": r["prompt"], "completion": r["completion"], "answer": r["answer"]} for r in rows]


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "aesl_lightning",
                 "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------- ours
def ours_side(opts, tmp: str) -> dict:
    import lightning as L
    import torch

    from _timing import StepTimer  # benchmarks/ is on sys.path when run as a script
    from aesl_lightning.data import SFTDataModule
    from aesl_lightning.data.synthetic import write_jsonl
    from aesl_lightning import LossConfig, SFTModule
    from aesl_lightning.modules.evaluation import ValidationGeneration

    class CountingTimer(StepTimer):
        """The step's completion tokens (counted before the clock starts), then the shared step timer."""

        def __init__(self) -> None:
            super().__init__()
            self.tokens: list[int] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tokens.append(int((batch["labels"] != -100).sum()))
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.losses.append(float(trainer.callback_metrics["train/loss"]))  # mean CE per completion token

    path = os.path.join(tmp, "coldstart.jsonl")
    write_jsonl(records(opts), path)
    start = time.perf_counter()
    L.seed_everything(opts.seed, verbose=False)
    module = SFTModule(MODEL, dtype="float32", gradient_checkpointing=False, loss=LossConfig(name="ce"), lr=opts.lr,
                       weight_decay=0.0, betas=(opts.beta1, opts.beta2), warmup_steps=0, scheduler="constant",
                       val_generation=ValidationGeneration(num_prompts=0, kl_to_base=False),
                       histogram_every_n_steps=0, gate_check_batches=0, update_norm_every_n_steps=0)
    data = SFTDataModule(train=path, val_size=0, max_length=opts.max_length, overlong="error", batch_size=opts.batch,
                         num_workers=0, shuffle=False, seed=opts.seed)
    timer = CountingTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=opts.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    model = module.model
    return {"times": timer.times, "tokens": timer.tokens, "losses": timer.losses, "wall": time.perf_counter() - start,
            "threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
            "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}


# ------------------------------------------------------------------------------------------------------ TRL
def trl_side(opts, tmp: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from _timing import HFStepTimer  # benchmarks/ is on sys.path when run as a script

    from aesl_lightning.data.encode import encode_sft_examples
    from aesl_lightning.data.formats import SFTExample
    from aesl_lightning.infra.models import smollm2_cache_dir


    start = time.perf_counter()
    model_dir = str(smollm2_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = records(opts)
    if opts.trl_data == "conversational":
        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    else:  # the toolkit's own encoding: identical ids and labels on both sides
        examples = [SFTExample(prompt=r["prompt"], completion=r["completion"], source=f"coldstart:{i}")
                    for i, r in enumerate(rows)]
        encoded, _ = encode_sft_examples(tokenizer, examples, opts.max_length, "error")
        dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    args = SFTConfig(
        output_dir=os.path.join(tmp, "trl-out"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        seed=opts.seed, max_steps=opts.steps, per_device_train_batch_size=opts.batch, gradient_accumulation_steps=1,
        learning_rate=opts.lr, adam_beta1=opts.beta1, adam_beta2=opts.beta2, adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", max_grad_norm=1.0,
        # SFTConfig defaults gradient checkpointing on (transformers 5 calls it activation_checkpointing; the old
        # name still works, deprecated); SFTModule's default, and this run, is off
        activation_checkpointing=False,
        packing=False, padding_free=False, max_length=opts.max_length, completion_only_loss=True, loss_type="nll",
        use_liger_kernel=False, train_sampling_strategy="sequential", shuffle_dataset=False,  # the given order
        logging_strategy="no", save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    timer = HFStepTimer()
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collate(examples):  # runs when the loader builds a batch, before the step's clock starts
        batch = collate(examples)
        tokens.append(int((batch["labels"] != -100).sum()))
        return batch

    trainer.data_collator = counting_collate
    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        losses.append(float((out[0] if return_outputs else out).detach()))  # mean CE per completion token
        return out

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    model = trainer.model
    return {"times": timer.times, "tokens": tokens[: len(timer.times)], "losses": losses,
            "wall": time.perf_counter() - start,
            "threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
            "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}


def run_side(opts) -> None:
    """Child process: one side's run; its result (with this process's peak RSS) goes to `--result` as JSON."""
    if not opts.verbose:
        quiet()
    with tempfile.TemporaryDirectory() as tmp:
        result = ours_side(opts, tmp) if opts.side == "ours" else trl_side(opts, tmp)
    result["peak_rss_mib"] = peak_rss_mib()
    with open(opts.result, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------- main
def spawn(side: str, opts, tmp: str) -> dict:
    result = os.path.join(tmp, f"{side}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--result", result]
    for name in ("steps", "batch", "max_length", "lr", "beta1", "beta2", "seed", "data_seed", "trl_data"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(opts, name))]
    if opts.verbose:
        cmd.append("--verbose")
    proc = subprocess.run(cmd, capture_output=not opts.verbose, text=True)
    if proc.returncode != 0:
        if not opts.verbose:
            sys.stderr.write((proc.stdout or "")[-4000:] + (proc.stderr or "")[-8000:])
        raise SystemExit(f"the {side} side failed (exit status {proc.returncode})")
    with open(result) as f:
        return json.load(f)


def fmt(values, spec: str) -> str:
    return "[" + ", ".join(format(v, spec) for v in values) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run (each side, each round)")
    parser.add_argument("--drop-first", type=int, default=1, help="steps dropped as warm-up at the start of each run")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (per device; no accumulation)")
    parser.add_argument("--max-length", type=int, default=256, help="longest example in tokens (none is longer)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, alternating which side runs first")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the cold-start split")
    parser.add_argument("--trl-data", choices=["tokenized", "conversational"], default="tokenized",
                        help="TRL gets the toolkit's ids and labels, or the conversational records to tokenize")
    parser.add_argument("--competing-load", action="store_true",
                        help="run beside a torch matmul loop keeping one core busy")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning / transformers / TRL output")
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: one side's child run
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side is not None:
        run_side(opts)
        return
    if not 0 <= opts.drop_first < opts.steps:
        parser.error(f"--drop-first must be in [0, --steps) so that a step is kept, got {opts.drop_first}")

    from importlib.metadata import version

    import torch

    load = subprocess.Popen([sys.executable, "-c", LOAD]) if opts.competing_load else None
    try:
        if load is not None:
            time.sleep(5)
        omp = os.environ.get("OMP_NUM_THREADS", "unset")
        cpu = " ".join(part for part in (platform.machine(), platform.processor()) if part)
        print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} "
              f"{platform.release()}; python {platform.python_version()}, torch {torch.__version__}, transformers "
              f"{version('transformers')}, trl {version('trl')}, lightning {version('lightning')}; "
              f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={omp}); competing torch process: "
              f"{'yes' if load else 'no'}; load average at start {os.getloadavg()}", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(opts.rounds):
                for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                    res = spawn(side, opts, tmp)
                    runs[side].append(res)
                    rates = [n / t for n, t in zip(res["tokens"], res["times"])]
                    print(f"round {r + 1} {side:>4}: step s {fmt(res['times'], '.2f')}, completion tokens "
                          f"{res['tokens']}, tokens/s {fmt(rates, '.0f')} (first {opts.drop_first} dropped), loss "
                          f"{fmt(res['losses'], '.4f')}; peak RSS "
                          f"{res['peak_rss_mib']:.0f} MiB; process {res['wall']:.0f} s; {res['threads']} threads, "
                          f"attention {res['attn']}, gradient checkpointing {res['checkpointing']}", flush=True)
    finally:
        if load is not None:
            load.kill()
            load.wait()

    summary = {}
    for side, results in runs.items():
        times = [t for res in results for t in res["times"][opts.drop_first:]]
        tokens = [n for res in results for n in res["tokens"][opts.drop_first:]]
        if len(times) != len(tokens):
            raise SystemExit(f"{side}: {len(times)} timed steps but {len(tokens)} token counts")
        summary[side] = {"rate": statistics.median(n / t for n, t in zip(tokens, times)),
                         "step": statistics.median(times), "tokens": statistics.median(tokens),
                         "mean_tokens": statistics.fmean(tokens), "n": len(times),
                         "rss": max(res["peak_rss_mib"] for res in results)}
    ours, trl = summary["ours"], summary["trl"]
    ratio = ours["rate"] / trl["rate"]
    token_diff = trl["mean_tokens"] / ours["mean_tokens"] - 1
    print()
    print(f"model {MODEL}, fp32 CPU; batch {opts.batch} examples/step, max_length {opts.max_length}, {opts.steps} "
          f"steps/run (first {opts.drop_first} dropped), {opts.rounds} round(s); data: the first "
          f"{opts.batch * opts.steps} cold-start word problems (seed {opts.data_seed}), TRL data {opts.trl_data}; "
          f"CE on completion tokens, AdamW lr {opts.lr} betas ({opts.beta1}, {opts.beta2}) weight decay 0, constant, "
          f"max_grad_norm 1.0, no gradient checkpointing, no packing / padding-free")
    print(f"steps kept: ours {ours['n']}, TRL {trl['n']}")
    same = [res["tokens"] for res in runs["ours"]] == [res["tokens"] for res in runs["trl"]]
    print(f"completion tokens per step (median): ours {ours['tokens']:.0f}, TRL {trl['tokens']:.0f} "
          f"(mean TRL / ours {1 + token_diff:.3f}; the same in every step: {'yes' if same else 'no'})")
    # the same batches, weights and optimiser give the same loss in every step (up to float rounding)
    loss_diff = max(abs(a - b) for x, y in zip(runs["ours"], runs["trl"]) for a, b in zip(x["losses"], y["losses"]))
    note = "" if opts.trl_data == "tokenized" else " (other labels on TRL's side: not comparable)"
    print(f"largest loss difference between the sides at the same step: {loss_diff:.2e}{note}")
    if abs(token_diff) > TOKEN_TOLERANCE:
        why = (" TRL's conversational encoding also labels the chat template's '\\n' after <|im_end|> (one token "
               "per example); the default --trl-data tokenized trains TRL on the toolkit's own ids and labels.") \
            if opts.trl_data == "conversational" else ""
        print(f"WARNING: completion tokens per step differ by {token_diff:+.1%} (more than "
              f"{TOKEN_TOLERANCE:.0%}).{why}")
    names = {"ours": "ours (SFTModule + Lightning)", "trl": f"TRL {version('trl')} SFTTrainer"}
    for side, name in names.items():
        print(f"median throughput  {name:<29} {summary[side]['rate']:8.1f} completion tokens/s "
              f"(median step {summary[side]['step']:.2f} s)")
    print(f"peak RSS (ru_maxrss, highest over rounds): ours {ours['rss']:.0f} MiB, TRL {trl['rss']:.0f} MiB "
          f"(ours / TRL {ours['rss'] / trl['rss']:.3f})")
    print(f"throughput ratio ours / TRL: {ratio:.3f}  (target >= 1.0: {'met' if ratio >= 1.0 else 'NOT met'})")
    print(f"load average at end {os.getloadavg()}")
    if opts.json:
        result = {"setting": {"model": MODEL, "dtype": "fp32", "batch": opts.batch, "steps": opts.steps,
                              "drop_first": opts.drop_first, "rounds_in_script": opts.rounds, "max_length": opts.max_length,
                              "trl_data": opts.trl_data, "loss": "CE on completion tokens", "lr": opts.lr,
                              "timing": "callback span on both sides (on_train_batch_start/end; on_step_begin/end)"},
                  "summary": {"throughput_ratio": ratio, "ours_tokens_per_s": ours["rate"], "trl_tokens_per_s": trl["rate"],
                              "ours_step_s": ours["step"], "trl_step_s": trl["step"], "ours_tokens_per_step": ours["tokens"],
                              "trl_tokens_per_step": trl["tokens"], "ours_peak_rss_mib": ours["rss"],
                              "trl_peak_rss_mib": trl["rss"], "peak_rss_ratio": ours["rss"] / trl["rss"],
                              "max_loss_diff": loss_diff},
                  "raw": runs}
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
