"""One GRPO optimisation step of `GRPOModule` (Lightning) against TRL's `GRPOTrainer`, same settings.

Same tiny model (the built-in tiny-llama, saved to a temp folder for TRL, which also loads its reference
from there), same char-level tokenizer and ChatML template, same synthetic arithmetic prompts, same reward
(`aesl_lightning.rewards.boxed_format`), G = 4 completions for each of 4 prompts per step (16 completions),
32 completion tokens at temperature 1.0, beta 0.04, epsilon 0.2, loss_type "grpo", one iteration per
generation, plain AdamW lr 1e-5 constant (no decay), no gradient checkpointing, max_grad_norm 1.0, fp32 on CPU. Both are run in one process, in rounds
that alternate the order; the first step of each run is dropped (warm-up). Reports the median step time of
each and the time ratio (ours / TRL; target < 1).

TRL is used by this script only (never by the package); it must run offline:

    python benchmarks/bench_grpo_vs_trl.py
    python benchmarks/bench_grpo_vs_trl.py --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
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
from aesl_lightning.data.synthetic import ArithmeticConfig, generate_arithmetic
from aesl_lightning.grpo import GRPOConfig, GRPOEvaluation, GRPOModule
from aesl_lightning.models import load_causal_lm, load_tokenizer
from aesl_lightning.rewards import boxed_format

MODEL = "tiny-llama"
DATA = ArithmeticConfig(num_examples=64, seed=3)
G, PROMPTS_PER_STEP, MAX_COMPLETION, TEMPERATURE = 4, 4, 32, 1.0
BETA, EPSILON, LOSS_TYPE, NUM_ITERATIONS, LR, MAX_GRAD_NORM = 0.04, 0.2, "grpo", 1, 1e-5, 1.0


# ----------------------------------------------------------------------------------------------------- ours
def ours_steps(steps: int, seed: int) -> list[float]:
    L.seed_everything(seed, verbose=False)
    grpo = GRPOConfig(num_generations=G, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=MAX_COMPLETION, beta=BETA,
                      epsilon=EPSILON, loss_type=LOSS_TYPE, scale_rewards="group", num_iterations=NUM_ITERATIONS,
                      reward_funcs=["aesl_lightning.rewards.boxed_format"], max_grad_norm=MAX_GRAD_NORM,
                      log_completions_every_n_steps=0)
    module = GRPOModule(MODEL, dtype="float32", grpo=grpo, evaluation=GRPOEvaluation(num_samples=0), lr=LR,
                        weight_decay=0.0, warmup_steps=0, scheduler="constant")
    data = PromptDataModule(train="synthetic", synthetic=DATA, val_size=0, test_size=0, batch_size=PROMPTS_PER_STEP,
                            num_workers=0, shuffle=True, seed=seed)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return timer.times


# ------------------------------------------------------------------------------------------------------ TRL
def trl_steps(steps: int, seed: int, model_dir: str, out_dir: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer


    records = generate_arithmetic(DATA)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in records])
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
    )
    timer = HFStepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=boxed_format, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
    trainer.train()
    return timer.times


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating which side runs first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="keep Lightning / transformers / TRL logging")
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

        ours: list[float] = []
        theirs: list[float] = []
        for r in range(opts.rounds):
            order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
            for side in order:
                if side == "ours":
                    times = ours_steps(opts.steps, opts.seed + r)
                    ours += times[1:]
                else:
                    times = trl_steps(opts.steps, opts.seed + r, model_dir, os.path.join(tmp, f"trl-out-{r}"))
                    theirs += times[1:]
                print(f"round {r + 1} {side:>4}: " + " ".join(f"{t * 1e3:7.1f}" for t in times) + "  ms (first dropped)",
                      flush=True)

    med_ours, med_trl = statistics.median(ours), statistics.median(theirs)
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
    print(f"time ratio ours / TRL: {med_ours / med_trl:.3f}  (target < 1: {'met' if med_ours < med_trl else 'NOT met'})")


if __name__ == "__main__":
    main()
