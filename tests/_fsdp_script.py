"""GRPO on tiny-llama, single process or FSDP2 over gloo with 2 CPU processes; run by tests/test_fsdp.py.

    python tests/_fsdp_script.py --devices 1 --steps 3 --out DIR
    python tests/_fsdp_script.py --devices 2 --steps 2 --resume-steps 3 --out DIR
    python tests/_fsdp_script.py --generation-check PORT --out DIR

Rollouts are seeded per (prompt, step) and generated prompt by prompt, so they do not depend on how prompts
are split over ranks; the reward is deterministic. The training set is one batch (4 prompts: 4 per step in
one process, 2 per rank in two), so every epoch is one step and a resume lands on an epoch boundary.
Writes `losses_rank{r}.json`, `params.pt` (full weights, rank 0) and, with 2 devices, `hf_model/`.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, whatever is pip-installed

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from aesl_lightning.data import PromptDataModule  # noqa: E402
from aesl_lightning.data.synthetic import ArithmeticConfig  # noqa: E402
from aesl_lightning.fsdp import full_state_dict  # noqa: E402
from aesl_lightning.generation import Generation, generate  # noqa: E402
from aesl_lightning.grpo import GRPOConfig, GRPOEvaluation, GRPOModule  # noqa: E402


def high_chars(prompts, completions, **_):
    """Deterministic reward a random model can improve on: the mean code point of the text, in [0, 1]."""
    return [sum((ord(c) - 32) / 94 for c in t) / len(t) if t else 0.0 for t in completions]


class SeededGRPO(GRPOModule):
    """Rollouts seeded per (prompt, step), one prompt at a time: independent of the batch split over ranks."""

    def sample(self, input_ids, attention_mask, sampling):
        parts = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()].unsqueeze(0)
            digest = hashlib.sha256(f"{prompt.tolist()}-{self.global_step}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:4], "little"))
            parts.append(generate(self.model, self.tokenizer, prompt, torch.ones_like(prompt), sampling, record_entropy=True))
        width = max(p.completion_ids.shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id

        def right_pad(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        g = sampling.num_samples
        return Generation(
            prompt_ids=input_ids.repeat_interleave(g, dim=0),
            prompt_mask=attention_mask.repeat_interleave(g, dim=0),
            completion_ids=torch.cat([right_pad(p.completion_ids, pad) for p in parts]),
            completion_mask=torch.cat([right_pad(p.completion_mask, False) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            texts=[t for p in parts for t in p.texts],
            entropy=torch.cat([right_pad(p.entropy, 0.0) for p in parts]),
        )


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def build(args):
    module = SeededGRPO(
        "tiny-llama",
        grpo=GRPOConfig(num_generations=4, max_new_tokens=6, beta=0.04, num_iterations=args.num_iterations,
                        loss_type=args.loss_type, reward_funcs=["__main__.high_chars"], log_completions_every_n_steps=0),
        evaluation=GRPOEvaluation(num_samples=0, greedy=False),
        lr=1e-3, scheduler="constant", warmup_steps=0,
    )
    per_rank = 4 // args.devices
    data = PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=4, seed=1, max_steps=1),
                            val_size=0, test_size=0, batch_size=per_rank, max_prompt_length=400, shuffle=False)
    return module, data


def trainer(args, steps, callbacks):
    strategy = "auto"
    if args.devices == 2:
        strategy = "ddp" if args.ddp else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=steps, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=callbacks, default_root_dir=args.out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-steps", type=int, default=0)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--loss-type", default="grpo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2 with 2 devices")
    parser.add_argument("--generation-check", type=int, default=0, metavar="PORT",
                        help="only check generation under FSDP2 with 2 ranks, using this TCP port")
    args = parser.parse_args()
    out = Path(args.out)
    if args.generation_check:
        generation_check(args.out, args.generation_check)
        return
    L.seed_everything(0)
    record = RecordLosses()
    module, data = build(args)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    fit = trainer(args, args.steps, [record, ckpt])
    fit.fit(module, data)
    if args.resume_steps:
        module, data = build(args)
        fit = trainer(args, args.resume_steps, [record])
        fit.fit(module, data, ckpt_path=str(out / "ckpt" / "last.ckpt"))
    rank = fit.global_rank
    state = full_state_dict(module.model)
    if rank == 0 or args.ddp:  # DDP: every rank's replica, to check they stayed in sync
        name = f"params_rank{rank}.pt" if args.ddp and rank else "params.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / name)
    (out / f"losses_rank{rank}.json").write_text(json.dumps({"losses": record.losses, "global_step": fit.global_step,
                                                             "world_size": fit.world_size, "pid": os.getpid()}))
    if args.devices == 2 and not args.ddp:
        module.export_hf(out / "hf_model")



def _generation_worker(rank: int, world: int, port: int, out: str) -> None:
    """Shard tiny-llama over 2 gloo ranks and generate different lengths per rank inside
    `unsharded_for_generation`; the tokens must equal the unsharded model's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from aesl_lightning.fsdp import shard_model, unsharded_for_generation
    from aesl_lightning.generation import SamplingConfig
    from aesl_lightning.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokenizer = load_tokenizer("tiny-llama")
    plain = load_causal_lm("tiny-llama").eval()
    model = shard_model(load_causal_lm("tiny-llama").eval(), init_device_mesh("cpu", (world,)))
    prompt = tokenizer(["What is 2+3?"], return_tensors="pt")
    greedy = SamplingConfig(1, 0.0, 1.0, max_new_tokens=3 + 17 * rank)  # rank 0 stops long before rank 1
    with unsharded_for_generation(model):
        sharded = generate(model, tokenizer, prompt["input_ids"], prompt["attention_mask"], greedy)
    expected = generate(plain, tokenizer, prompt["input_ids"], prompt["attention_mask"], greedy)
    # afterwards the parameters are sharded again and a training forward/backward still works
    resharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    model.train()
    model(input_ids=prompt["input_ids"], labels=prompt["input_ids"]).loss.backward()
    result = {"rank": rank, "length": sharded.completion_ids.shape[1], "resharded": resharded,
              "equal": torch.equal(sharded.completion_ids, expected.completion_ids)}
    Path(out, f"generation_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def generation_check(out: str, port: int) -> None:
    torch.multiprocessing.spawn(_generation_worker, args=(2, port, out), nprocs=2, join=True)


if __name__ == "__main__":
    main()
