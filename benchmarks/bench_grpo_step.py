"""One GRPO step on the real model, taken apart: rollouts, log-prob passes, the whole step, and TRL's step.

Configuration (issue 15): SmolLM2-135M-Instruct (the built-in `smollm2-135m-instruct`, i.e. the base model:
no quickstart SFT export exists on the benchmark machine), fp32 on CPU, the built-in synthetic arithmetic
prompts, 8 prompts x G = 4 completions per step, max_new_tokens 64, temperature 1, beta 0.04, epsilon 0.2,
loss_type grpo, mu = 1, rewards math_accuracy + 0.1 x boxed_format, AdamW lr 1e-6 constant, max_grad_norm 1,
dropout disabled (ours by default, TRL's `disable_dropout=True`), with LoRA r 16 / alpha 32 / dropout 0.05 on
all linear layers (`--mode lora`) and with full fine-tuning (`--mode full`). Reported side by side, one run:

1. rollout tokens/s: `GRPOModule`'s sampling (eval mode, adapters merged; entropies come from the policy pass) against a bare
   `model.generate` of the merged model, same prompts, same seed (so the same tokens; target >= 0.9x);
2. each no-grad log-prob pass (old policy, reference) against a plain no-grad forward of the same tokens and
   model, with all logits (what a user would call) and with only the completion positions' logits
   (`logits_to_keep`, the strict comparison); target <= 1.3x;
3. the whole training step (median; first step dropped) against the time the bare merged model needs to
   generate that step's tokens (its tokens / the bare rate of 1.); target <= 3x; with our phase breakdown;
4. the step time against TRL's `GRPOTrainer` (same model, LoRA, batch, generation, loss; first step dropped);
   target <= 1.0x. Like for like: both sides are timed by a callback over the same span (Lightning
   `on_train_batch_start` -> `on_train_batch_end`, TRL `on_step_begin` -> `on_step_end`: sampling, scoring, the
   log-prob passes, backward and the optimiser; the module's own `train/time/step` is kept beside it), both see
   the same prompts in the same order (no shuffling on either side; TRL's dataset is our data module's training
   examples, in order; the prompts each step drew are recorded and compared), and both count the completion
   tokens they generated (each side's completion mask), so the ratio is also given per generated token.

    python benchmarks/bench_grpo_step.py                          # both modes, TRL included
    python benchmarks/bench_grpo_step.py --mode lora --steps 4 --rounds 3
    python benchmarks/bench_grpo_step.py --competing-load         # beside another torch (OpenMP) process
    python benchmarks/bench_grpo_step.py --mode lora --prompts 2 --max-new-tokens 32 --json out.json   # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import lightning as L
import torch

from _timing import HFStepTimer, StepTimer, competing_load  # benchmarks/ is on sys.path when run as a script
from aesl_lightning import GRPOModule, LoRAConfig, PromptDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.generation import eos_ids
from aesl_lightning.infra.lora import adapters_disabled, merge_lora
from aesl_lightning.infra.models import load_tokenizer, smollm2_cache_dir
from aesl_lightning.modules.grpo_config import GRPOConfig, GRPOEvaluation
from aesl_lightning.modules.rollout import eval_mode, sampling_weights
from aesl_lightning.scoring.rewards import boxed_format, math_accuracy

MODEL = "smollm2-135m-instruct"
DATA = ArithmeticConfig(num_examples=64, seed=3)
PROMPTS, G, MAX_NEW, TEMPERATURE, BETA, EPSILON, LR, MAX_GRAD_NORM = 8, 4, 64, 1.0, 0.04, 0.2, 1e-6, 1.0
REWARDS, WEIGHTS = ["aesl_lightning.scoring.rewards.math_accuracy", "aesl_lightning.scoring.rewards.boxed_format"], [1.0, 0.1]
LORA = LoRAConfig(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear")


class TimedGRPO(GRPOModule):
    """Records each step's sampled tokens, prompts and phase times (from the step's own `train/time/*` logs)."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.records: list[dict] = []

    def make_rollout(self, batch, timer=None):
        rollout = super().make_rollout(batch, timer)
        self._tokens = int(rollout.generation.lengths.sum())
        self._prompts = [prompt_text(p) for p in batch["prompt"]]
        return rollout

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        metrics = self.trainer.callback_metrics
        record = {k.split("/")[-1]: float(v) for k, v in metrics.items() if k.startswith("train/time/")}
        self.records.append({**record, "tokens": self._tokens, "prompts": self._prompts})


def prompt_text(prompt) -> str:
    """A prompt as the text of its last user turn (a plain string stays as it is), to compare the two sides'."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


def build(mode: str, seed: int) -> tuple[TimedGRPO, PromptDataModule]:
    L.seed_everything(seed, verbose=False)
    grpo = GRPOConfig(num_generations=G, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=MAX_NEW, beta=BETA,
                      epsilon=EPSILON, loss_type="grpo", scale_rewards="group", num_iterations=1, reward_funcs=REWARDS,
                      reward_weights=WEIGHTS, max_grad_norm=MAX_GRAD_NORM, log_completions_every_n_steps=0)
    module = TimedGRPO(MODEL, dtype="float32", lora=LORA if mode == "lora" else None, grpo=grpo,
                       evaluation=GRPOEvaluation(num_samples=0), lr=LR, warmup_steps=0, scheduler="constant")
    # no shuffling: TRL gets the same examples in the same order (`trl_dataset`)
    data = PromptDataModule(train="synthetic", synthetic=DATA, val_size=0, test_size=0, batch_size=PROMPTS,
                            num_workers=0, shuffle=False, seed=seed, max_prompt_length=256)
    return module, data


# ------------------------------------------------------------------------------------ 1. and 2.: the parts
WARMUP = 1


CPU_TIMES: dict[str, list[float]] = {}


def median_seconds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Each fn timed `rounds` times after WARMUP untimed rounds, the order alternating per round. The process's
    CPU seconds of each call go to CPU_TIMES (on a shared machine they move less with the others' load)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds + WARMUP):
        for name in names if r % 2 == 0 else names[::-1]:
            start, cpu = time.perf_counter(), time.process_time()
            fns[name](r)
            if r >= WARMUP:
                times[name].append(time.perf_counter() - start)
                CPU_TIMES.setdefault(name, []).append(time.process_time() - cpu)
    return times


def parts(module: TimedGRPO, data: PromptDataModule, mode: str, rounds: int) -> dict:
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    keep = batch["attention_mask"].any(dim=0)
    ids, mask = batch["input_ids"][:, keep], batch["attention_mask"][:, keep]
    sampling, tokenizer, model = module.grpo.sampling, module.tokenizer, module.model
    bare_model = merge_lora(model).eval() if mode == "lora" else model
    eos = eos_ids(model, tokenizer)
    tokens: dict[str, list[int]] = {"ours": [], "bare": []}
    generations = []

    def ours(r):
        torch.manual_seed(100 + r)
        with eval_mode(model), sampling_weights(model):
            generations.append(module.sample(ids, mask, sampling))
        tokens["ours"].append(int(generations[-1].lengths.sum()))

    def bare(r):
        torch.manual_seed(100 + r)
        with torch.no_grad(), eval_mode(bare_model):
            out = bare_model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                      top_p=1.0, top_k=None, num_return_sequences=G, max_new_tokens=MAX_NEW,
                                      eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        completion = out[:, ids.shape[1]:]
        is_eos = torch.isin(completion, torch.tensor(eos))
        tokens["bare"].append(int(((is_eos.cumsum(1) - is_eos.long()) == 0).sum()))

    CPU_TIMES.clear()
    sample_times = median_seconds({"ours": ours, "bare": bare}, rounds)
    rates = {k: statistics.median(n / t for n, t in zip(tokens[k][WARMUP:], sample_times[k])) for k in tokens}
    cpu_rates = {k: statistics.median(n / t for n, t in zip(tokens[k][WARMUP:], CPU_TIMES[k])) for k in tokens}

    gen = generations[-1]  # the log-prob passes score the last rollout, as make_rollout would
    input_ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)
    attention_mask = torch.cat([gen.prompt_mask, gen.completion_mask.long()], dim=1)
    args = (input_ids, attention_mask, gen.completion_ids, gen.completion_mask)
    keep_logits = gen.completion_ids.shape[1] + 1
    reference = module.reference_model

    def logp_pass(kind):
        def run(_):
            with torch.no_grad(), eval_mode(model):
                if kind == "old":  # as make_rollout: the entropy too (the first policy pass's exact call)
                    module.sequence_log_probs(model, *args, return_entropy=True)
                elif reference is not None:
                    module.sequence_log_probs(reference, *args)
                else:
                    with adapters_disabled(model):
                        module.sequence_log_probs(model, *args)
        return run

    def plain(kind, logits_to_keep):
        def run(_):
            target = reference if kind == "ref" and reference is not None else model
            kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
            with torch.no_grad(), eval_mode(model):
                if kind == "ref" and reference is None:
                    with adapters_disabled(model):
                        target(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                else:
                    target(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return run

    passes, cpu_passes = {}, {}
    for kind in ("old", "ref"):
        CPU_TIMES.clear()
        t = median_seconds({"ours": logp_pass(kind), "plain_all": plain(kind, 0), "plain_keep": plain(kind, keep_logits)},
                           rounds)
        passes[kind] = {k: statistics.median(v) for k, v in t.items()}
        cpu_passes[kind] = {k: statistics.median(v) for k, v in CPU_TIMES.items()}
    return {"rates": rates, "cpu_rates": cpu_rates, "cpu_passes": cpu_passes, "tokens": tokens, "same_tokens": tokens["ours"] == tokens["bare"], "passes": passes,
            "shape": list(input_ids.shape), "completion_len": gen.completion_ids.shape[1],
            "completion_tokens": int(gen.completion_mask.sum())}


# -------------------------------------------------------------------------------------- 3. and 4.: steps
def our_steps(module: TimedGRPO, data: PromptDataModule, steps: int, callbacks: tuple = (), precision: str = "32-true") -> list[dict]:
    """Each step's record: `wall` (the callback span, as TRL's is timed), `step` (the module's own
    `train/time/step`), the phases, `tokens` generated and the `prompts` drawn. `precision`: the Trainer's."""
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False, precision=precision,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer, *callbacks])
    trainer.fit(module, datamodule=data)
    return [{**r, "wall": t} for r, t in zip(module.records, timer.times)]


def trl_dataset():
    """Our data module's training examples, in its order, as TRL's conversational prompt records."""
    data = PromptDataModule(train="synthetic", synthetic=DATA, val_size=0, test_size=0, batch_size=PROMPTS,
                            num_workers=0, shuffle=False, max_prompt_length=256)
    data.attach_tokenizer(load_tokenizer(MODEL))
    data.setup("fit")
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(e.prompt)}], "answer": e.answer}
                              for e in data.examples["train"]])


def trl_steps(mode: str, steps: int, seed: int, out_dir: str) -> list[dict]:
    """TRL's steps: `wall` (on_step_begin -> on_step_end), `tokens` (its completion mask's sum) and `prompts`."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer


    # TRL hands conversational completions to reward functions as message lists
    def accuracy(prompts, completions, answer, **_):
        return math_accuracy(prompts, [c[-1]["content"] for c in completions], answer=answer)

    def fmt(prompts, completions, **_):
        return boxed_format(prompts, [c[-1]["content"] for c in completions])

    model_dir = str(smollm2_cache_dir())
    dataset = trl_dataset()
    args = TRLConfig(
        output_dir=out_dir, report_to="none", use_cpu=True, bf16=False, fp16=False, seed=seed, max_steps=steps,
        per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=MAX_NEW, temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=BETA, epsilon=EPSILON,
        loss_type="grpo", scale_rewards="group", num_iterations=1, reward_weights=WEIGHTS, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        gradient_checkpointing=False, max_grad_norm=MAX_GRAD_NORM, disable_dropout=True, use_vllm=False,
        log_completions=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
        shuffle_dataset=False,  # the dataset's order, as ours
    )
    peft_config = None
    if mode == "lora":
        peft_config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                 target_modules=LORA.target_modules, task_type="CAUSAL_LM")
    timer = HFStepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[accuracy, fmt], args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer],
                          peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    drawn: list[dict] = []
    generate_and_score = trainer._generate_and_score_completions

    def counting(inputs):  # inside the step's span, as our counting is; costs one sum
        out = generate_and_score(inputs)
        drawn.append({"tokens": int(out["completion_mask"].sum()),
                      "prompts": [prompt_text(x["prompt"]) for x in inputs[::G]]})
        return out

    trainer._generate_and_score_completions = counting
    trainer.train()
    return [{"wall": t, **d} for t, d in zip(timer.times, drawn)]


# ------------------------------------------------------------------------------------------------------ main
def run_mode(mode: str, opts, order_trl_first: bool) -> dict:
    """Prints 1.-4. for one mode and returns its figures (`summary`) and raw numbers (`raw`)."""
    module, data = build(mode, opts.seed)
    p = parts(module, data, mode, opts.rounds)
    print(f"\n=== {mode}: {PROMPTS} prompts x G={G}, max_new_tokens {MAX_NEW}, beta {BETA}; rollout batch "
          f"{p['shape']} (completion width {p['completion_len']}, {p['completion_tokens']} completion tokens)", flush=True)
    ratio = p["rates"]["ours"] / p["rates"]["bare"]
    summary = {"rollout_ours_tokens_per_s": p["rates"]["ours"], "rollout_bare_tokens_per_s": p["rates"]["bare"],
               "rollout_ratio": ratio, "rollout_same_tokens": float(p["same_tokens"])}
    print(f"1. rollout: ours {p['rates']['ours']:.1f} tokens/s, bare merged generate {p['rates']['bare']:.1f} tokens/s, "
          f"ratio {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'}); same tokens: {p['same_tokens']} "
          f"{p['tokens']['ours'][WARMUP:]}; per CPU second: ours {p['cpu_rates']['ours']:.1f}, bare "
          f"{p['cpu_rates']['bare']:.1f} tokens, ratio {p['cpu_rates']['ours'] / p['cpu_rates']['bare']:.3f}", flush=True)
    for kind, t in p["passes"].items():
        r_all, r_keep = t["ours"] / t["plain_all"], t["ours"] / t["plain_keep"]
        summary.update({f"{kind}_pass_s": t["ours"], f"{kind}_pass_over_plain_all": r_all, f"{kind}_pass_over_plain_keep": r_keep})
        print(f"2. {kind} log-prob pass: {t['ours'] * 1e3:.0f} ms; plain forward all logits {t['plain_all'] * 1e3:.0f} ms "
              f"(ratio {r_all:.2f}), completion logits only {t['plain_keep'] * 1e3:.0f} ms (ratio {r_keep:.2f}); "
              f"target <= 1.3: {'met' if r_keep <= 1.3 else ('met vs all logits only' if r_all <= 1.3 else 'MISSED')}",
              flush=True)
        c = p["cpu_passes"][kind]
        print(f"   CPU seconds: ours {c['ours']:.1f}, plain all logits {c['plain_all']:.1f}, completion logits only "
              f"{c['plain_keep']:.1f} (ratios {c['ours'] / c['plain_all']:.2f}, {c['ours'] / c['plain_keep']:.2f})", flush=True)
    raw = {"parts": p}
    if opts.parts_only:
        return {"summary": summary, "raw": raw}

    def ours():
        return our_steps(module, data, opts.steps)[opts.drop_first:]

    def trl():
        with tempfile.TemporaryDirectory() as tmp:
            return trl_steps(mode, opts.steps, opts.seed, tmp)[opts.drop_first:]

    results = {}
    for side in (("trl", "ours") if order_trl_first else ("ours", "trl")):
        if side == "trl" and opts.no_trl:
            continue
        results[side] = ours() if side == "ours" else trl()
    raw["steps"] = results
    records = results["ours"]
    wall, step = (statistics.median(r[k] for r in records) for k in ("wall", "step"))
    bare_ratio = statistics.median(r["wall"] / (r["tokens"] / p["rates"]["bare"]) for r in records)
    phases = {k: statistics.median(r.get(k, 0.0) for r in records)
              for k in ("sampling", "scoring", "old_logprobs", "ref_logprobs", "policy", "optimizer")}
    summary.update({"step_s": wall, "step_module_s": step, "step_over_bare_generation": bare_ratio,
                    "tokens_per_step": statistics.median(r["tokens"] for r in records),
                    **{f"phase_{k}_s": v for k, v in phases.items()}})
    print(f"3. step (callback span): median {wall:.2f} s over {len(records)} steps (first {opts.drop_first} dropped) "
          f"({[round(r['wall'], 2) for r in records]}; the module's train/time/step {step:.2f} s), tokens "
          f"{[r['tokens'] for r in records]}; step / bare generate of its tokens: {bare_ratio:.2f} (target <= 3: "
          f"{'met' if bare_ratio <= 3 else 'MISSED'})")
    print("   phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if v))
    if "trl" in results:
        theirs = results["trl"]
        trl_wall = statistics.median(r["wall"] for r in theirs)
        per_token = (statistics.median(r["wall"] / r["tokens"] for r in records)
                     / statistics.median(r["wall"] / r["tokens"] for r in theirs))
        same = [r["prompts"] for r in records] == [r["prompts"] for r in theirs]
        summary.update({"trl_step_s": trl_wall, "trl_tokens_per_step": statistics.median(r["tokens"] for r in theirs),
                        "step_over_trl": wall / trl_wall, "step_per_token_over_trl": per_token,
                        "same_prompts_as_trl": float(same)})
        print(f"4. TRL {__import__('trl').__version__} GRPOTrainer: median {trl_wall:.2f} s over {len(theirs)} steps "
              f"({[round(r['wall'], 2) for r in theirs]}), tokens {[r['tokens'] for r in theirs]}; ours / TRL "
              f"{wall / trl_wall:.3f} per step, {per_token:.3f} per generated token (target <= 1.0: "
              f"{'met' if wall <= trl_wall else 'MISSED'}); same prompts in the same order: {same}", flush=True)
    return {"summary": summary, "raw": raw}


def quiet_logs() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "aesl_lightning", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def main() -> None:
    global WARMUP, PROMPTS, G, MAX_NEW
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4, help="training steps per side (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the rollout and log-prob comparisons")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--drop-first", type=int, default=1, help="training steps dropped as warm-up (per side)")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step")
    parser.add_argument("--generations", type=int, default=G, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW, help="longest completion in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's GRPOTrainer")
    parser.add_argument("--parts-only", action="store_true", help="only the rollout and log-prob comparisons (1., 2.)")
    parser.add_argument("--competing-load", action="store_true", help="run beside a torch matmul loop keeping one core busy")
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")
    opts = parser.parse_args()
    WARMUP, PROMPTS, G, MAX_NEW = opts.warmup_rounds, opts.prompts, opts.generations, opts.max_new_tokens
    quiet_logs()
    import transformers

    with competing_load(opts.competing_load) as loaded:
        print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"lightning {L.__version__}; {torch.get_num_threads()} torch threads, {os.cpu_count()} cores; competing "
              f"torch process: {'yes' if loaded else 'no'}; load average at start {os.getloadavg()}")
        modes = ["lora", "full"] if opts.mode == "both" else [opts.mode]
        results = {mode: run_mode(mode, opts, order_trl_first=bool(i % 2)) for i, mode in enumerate(modes)}
        print(f"\nload average at end {os.getloadavg()}")
    if opts.json:
        one = len(modes) == 1
        summary = {(k if one else f"{m}_{k}"): v for m, res in results.items() for k, v in res["summary"].items()}
        setting = {"model": MODEL, "dtype": "fp32", "modes": modes, "prompts": PROMPTS, "G": G, "max_new_tokens": MAX_NEW,
                   "beta": BETA, "lora": f"r {LORA.r}, alpha {LORA.alpha}, {LORA.target_modules}", "steps": opts.steps,
                   "drop_first": opts.drop_first, "part_rounds": opts.rounds, "warmup_rounds": opts.warmup_rounds,
                   "torch_threads": torch.get_num_threads(), "step_timing": "callback span on both sides"}
        with open(opts.json, "w") as f:
            json.dump({"setting": setting, "summary": summary, "raw": {m: r["raw"] for m, r in results.items()}}, f,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
