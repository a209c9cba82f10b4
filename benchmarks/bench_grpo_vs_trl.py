"""One GRPO optimisation step of `GRPOModule` (Lightning) against TRL's `GRPOTrainer`, same settings.

Same tiny model (the built-in tiny-llama, saved to a temp folder for TRL, which also loads its reference
from there), same char-level tokenizer and ChatML template, same synthetic arithmetic prompts, same reward
(`aesl_lightning.scoring.rewards.boxed_format`), G = 4 completions for each of 4 prompts per step (16 completions),
32 completion tokens at temperature 1.0, beta 0.04, epsilon 0.2, loss_type "grpo", one iteration per
generation, plain AdamW lr 1e-5 constant (no decay), no gradient checkpointing, max_grad_norm 1.0, fp32 on CPU. Both are run in one process, in rounds
that alternate the order; the first step of each run is dropped (warm-up). Reports the median step time of
each and the time ratio (ours / TRL; target < 1). Like for like: both steps are timed by a callback over the same
span (`on_train_batch_start` -> `_end`; `on_step_begin` -> `_end`), both sides draw the same prompts in the same
order (no shuffling; TRL's dataset is our data module's examples in order; compared step by step), and both count
their generated tokens (completion masks), so the ratio is also given per generated token.

TRL is used by this script only (never by the package); it must run offline:

    python benchmarks/bench_grpo_vs_trl.py
    python benchmarks/bench_grpo_vs_trl.py --steps 8 --rounds 3
    python benchmarks/bench_grpo_vs_trl.py --steps 3 --rounds 1 --json out.json   # {"setting", "summary", "raw"}
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import torch

from _timing import HFStepTimer, StepTimer  # benchmarks/ is on sys.path when run as a script
from aesl_lightning import PromptDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer
from aesl_lightning.modules.grpo_config import GRPOConfig, GRPOEvaluation
from aesl_lightning.scoring.rewards import boxed_format
from bench_grpo_step import TimedGRPO, prompt_text

MODEL = "tiny-llama"
DATA = ArithmeticConfig(num_examples=64, seed=3)
G, PROMPTS_PER_STEP, MAX_COMPLETION, TEMPERATURE = 4, 4, 32, 1.0
BETA, EPSILON, LOSS_TYPE, NUM_ITERATIONS, LR, MAX_GRAD_NORM = 0.04, 0.2, "grpo", 1, 1e-5, 1.0


# ----------------------------------------------------------------------------------------------------- ours
def make_data(seed: int) -> PromptDataModule:
    """The prompts of both sides, in order (no shuffling)."""
    return PromptDataModule(train="synthetic", synthetic=DATA, val_size=0, test_size=0, batch_size=PROMPTS_PER_STEP,
                            num_workers=0, shuffle=False, seed=seed)


def ours_steps(steps: int, seed: int) -> list[dict]:
    L.seed_everything(seed, verbose=False)
    grpo = GRPOConfig(num_generations=G, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=MAX_COMPLETION, beta=BETA,
                      epsilon=EPSILON, loss_type=LOSS_TYPE, scale_rewards="group", num_iterations=NUM_ITERATIONS,
                      reward_funcs=["aesl_lightning.scoring.rewards.boxed_format"], max_grad_norm=MAX_GRAD_NORM,
                      log_completions_every_n_steps=0)
    module = TimedGRPO(MODEL, dtype="float32", grpo=grpo, evaluation=GRPOEvaluation(num_samples=0), lr=LR,
                        weight_decay=0.0, warmup_steps=0, scheduler="constant")
    data = make_data(seed)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return [{"wall": t, "tokens": r["tokens"], "prompts": r["prompts"]} for t, r in zip(timer.times, module.records)]


# ------------------------------------------------------------------------------------------------------ TRL
def trl_steps(steps: int, seed: int, model_dir: str, out_dir: str) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer


    data = make_data(seed)
    data.attach_tokenizer(load_tokenizer(MODEL))
    data.setup("fit")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(e.prompt)}], "answer": e.answer}
                                 for e in data.examples["train"]])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = TRLConfig(
        output_dir=out_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=G * PROMPTS_PER_STEP,  # completions per device in TRL
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        top_p=1.0,
        beta=BETA,
        epsilon=EPSILON,
        loss_type=LOSS_TYPE,
        scale_rewards="group",
        num_iterations=NUM_ITERATIONS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",  # torch.optim.AdamW, as GRPOModule (TRL's default is the fused variant)
        gradient_checkpointing=False,  # TRL's GRPOConfig defaults to True; GRPOModule's default is off
        max_grad_norm=MAX_GRAD_NORM,
        use_vllm=False,
        log_completions=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
        shuffle_dataset=False,  # the dataset's order, as ours
    )
    timer = HFStepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=boxed_format, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
    drawn: list[dict] = []
    generate_and_score = trainer._generate_and_score_completions

    def counting(inputs):  # inside the step's span, as our counting is
        out = generate_and_score(inputs)
        drawn.append({"tokens": int(out["completion_mask"].sum()), "prompts": [prompt_text(x["prompt"]) for x in inputs[::G]]})
        return out

    trainer._generate_and_score_completions = counting
    trainer.train()
    return [{"wall": t, **d} for t, d in zip(timer.times, drawn)]


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating which side runs first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="keep Lightning / transformers / TRL logging")
    parser.add_argument("--json", default=None, help="also write the result as JSON (setting, summary, raw) here")
    opts = parser.parse_args()
    if not opts.verbose:
        warnings.filterwarnings("ignore")
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "aesl_lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        import transformers

        transformers.logging.set_verbosity_error()

    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "tiny-llama")
        load_causal_lm(MODEL, dtype="float32").save_pretrained(model_dir)
        load_tokenizer(MODEL).save_pretrained(model_dir)

        ours: list[dict] = []
        theirs: list[dict] = []
        same = True
        for r in range(opts.rounds):
            order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
            drawn = {}
            for side in order:
                if side == "ours":
                    drawn[side] = ours_steps(opts.steps, opts.seed + r)
                    ours += drawn[side][1:]
                else:
                    drawn[side] = trl_steps(opts.steps, opts.seed + r, model_dir, os.path.join(tmp, f"trl-out-{r}"))
                    theirs += drawn[side][1:]
                print(f"round {r + 1} {side:>4}: " + " ".join(f"{d['wall'] * 1e3:7.1f}" for d in drawn[side])
                      + f"  ms (first dropped); tokens {[d['tokens'] for d in drawn[side]]}", flush=True)
            same = same and [d["prompts"] for d in drawn["ours"]] == [d["prompts"] for d in drawn["trl"]]

    med_ours, med_trl = (statistics.median(d["wall"] for d in side) for side in (ours, theirs))
    per_token = (statistics.median(d["wall"] / d["tokens"] for d in ours)
                 / statistics.median(d["wall"] / d["tokens"] for d in theirs))
    print()
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}, lightning {L.__version__}; torch threads {torch.get_num_threads()}, "
          f"cpu cores {os.cpu_count()}")
    print(f"model {MODEL} fp32 CPU; {PROMPTS_PER_STEP} prompts x G={G} = {PROMPTS_PER_STEP * G} completions/step, "
          f"max_completion {MAX_COMPLETION}, T={TEMPERATURE}, beta={BETA}, eps={EPSILON}, loss_type={LOSS_TYPE}, "
          f"mu={NUM_ITERATIONS}, lr={LR}, max_grad_norm={MAX_GRAD_NORM}")
    print(f"steps measured: ours {len(ours)}, TRL {len(theirs)} ({opts.rounds} rounds x {opts.steps - 1})")
    print(f"median step  ours (GRPOModule + Lightning): {med_ours * 1e3:8.1f} ms")
    print(f"median step  TRL GRPOTrainer:               {med_trl * 1e3:8.1f} ms")
    print(f"time ratio ours / TRL: {med_ours / med_trl:.3f}  (target < 1: {'met' if med_ours < med_trl else 'NOT met'}); "
          f"per generated token {per_token:.3f}; same prompts in the same order: {same}")
    if opts.json:
        summary = {"step_over_trl": med_ours / med_trl, "step_per_token_over_trl": per_token, "ours_step_ms": med_ours * 1e3,
                   "trl_step_ms": med_trl * 1e3, "same_prompts_as_trl": float(same),
                   "ours_tokens_per_step": statistics.median(d["tokens"] for d in ours),
                   "trl_tokens_per_step": statistics.median(d["tokens"] for d in theirs)}
        setting = {"model": MODEL, "dtype": "fp32", "prompts": PROMPTS_PER_STEP, "G": G, "max_new_tokens": MAX_COMPLETION,
                   "beta": BETA, "steps": opts.steps, "drop_first": 1, "rounds_in_script": opts.rounds,
                   "torch_threads": torch.get_num_threads(), "step_timing": "callback span on both sides"}
        with open(opts.json, "w") as f:
            json.dump({"setting": setting, "summary": summary, "raw": {"ours": ours, "trl": theirs}}, f, indent=1)


if __name__ == "__main__":
    main()
