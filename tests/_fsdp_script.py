"""GRPO on tiny-llama, single process or FSDP2 (or FSDP1) over gloo with 2 CPU processes; run by tests/test_fsdp.py.

    python tests/_fsdp_script.py --devices 1 --steps 3 --out DIR
    python tests/_fsdp_script.py --devices 2 --steps 2 --resume-steps 3 --out DIR
    python tests/_fsdp_script.py --devices 2 --steps 2 --fsdp1 --out DIR      # Lightning's FSDPStrategy
    python tests/_fsdp_script.py --devices 2 --steps 2 --lora --out DIR       # LoRA adapters only
    python tests/_fsdp_script.py --generation-check PORT --out DIR
    python tests/_fsdp_script.py --fsdp1-check PORT --out DIR                 # raw FSDP1, no Lightning

Rollouts are seeded per (prompt, step) and generated prompt by prompt, so they do not depend on how prompts
are split over ranks; the reward is deterministic. The training set is one batch (4 prompts: 4 per step in
one process, 2 per rank in two), so every epoch is one step and a resume lands on an epoch boundary.
Writes `losses_rank{r}.json`, `params.pt` (full weights, rank 0) and, with 2 devices, `hf_model/`.

Lightning's FSDPStrategy refuses CPUs; `CPUFSDPStrategy` below runs it on CPU for these tests only.
"""

import argparse
import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, whatever is pip-installed

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy  # noqa: E402

from aesl_lightning.infra import fsdp  # noqa: E402
from aesl_lightning.data import PromptDataModule  # noqa: E402
from aesl_lightning.data.synthetic import ArithmeticConfig  # noqa: E402
from aesl_lightning.infra.generation import Generation, generate  # noqa: E402
from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule  # noqa: E402
from aesl_lightning.infra.lora import LoRAConfig, adapters_disabled  # noqa: E402


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
            parts.append(generate(self.model, self.tokenizer, prompt, torch.ones_like(prompt), sampling))
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
        )

    full_loads = 0  # how often this rank read the full starting model (sharded_load: rank 0 once, others never)

    def _build_model(self, empty=False, frozen=False):
        SeededGRPO.full_loads += not empty
        return super()._build_model(empty, frozen)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # the gradient before clipping and AdamW, which both hide a uniformly scaled gradient (clip norm 1.0 is
        # active in these runs): its global norm, the same number on every rank
        self.grad_norms = getattr(self, "grad_norms", [])
        self.grad_norms.append(global_grad_norm(self.model))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def make_rollout(self, batch, timer=None):
        rollout = super().make_rollout(batch, timer)
        g = self.grpo.num_generations  # advantages per prompt, to compare across batch splits
        self.advantages = getattr(self, "advantages", [])
        self.advantages.append({p: rollout.advantages[i * g : (i + 1) * g].tolist() for i, p in enumerate(batch["prompt"])})
        return rollout


def global_grad_norm(model) -> float:
    """||grad|| over all parameters in float64: each rank's share summed over ranks when the model is sharded
    (FSDP2 DTensor shards, FSDP1 flat shards); a DDP replica or a single process holds the whole gradient."""
    import torch.distributed as dist

    squares = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            squares += grad.detach().double().pow(2).sum().cpu()
    if fsdp.is_sharded(model) and dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares)
    return squares.sqrt().item()


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses, self.kl = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        self.kl.append(float(trainer.callback_metrics["train/kl"]))


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) on CPU, for tests: the accelerator connector refuses CPUs for the
    FSDPStrategy class itself only, and FSDP1 needs `device_id=cpu` spelled out (Lightning passes the device
    index, None on CPU, which FSDP1 rejects without an accelerator)."""

    @contextmanager
    def model_sharded_context(self):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(wrapper_cls=FullyShardedDataParallel, cpu_offload=self.cpu_offload,
                         mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
                         device_id=torch.device("cpu"), **self.kwargs):
            yield


def build(args):
    module = SeededGRPO(
        "tiny-llama",
        grpo=GRPOConfig(num_generations=4, max_new_tokens=6, beta=0.04, num_iterations=args.num_iterations,
                        loss_type=args.loss_type, scale_rewards=args.scale_rewards, reward_funcs=["__main__.high_chars"], log_completions_every_n_steps=0),
        evaluation=GRPOEvaluation(num_samples=0, greedy=False),
        lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0) if args.lora else None,  # no dropout: same on every rank
        sharded_load=args.sharded_load,
        lr=1e-2 if args.lora else 1e-3, scheduler="constant", warmup_steps=0,
    )
    per_rank = 4 // args.devices
    data = PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=4, seed=1, max_steps=1),
                            val_size=0, test_size=0, batch_size=per_rank, max_prompt_length=400, shuffle=False)
    return module, data


def trainer(args, steps, callbacks, module):
    strategy = "auto"
    if args.devices == 2 and args.fsdp1:  # the recommended policy: one FSDP1 unit per decoder layer
        strategy = CPUFSDPStrategy(auto_wrap_policy=fsdp.decoder_layer_classes(module.model), state_dict_type="sharded")
    elif args.devices == 2:
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
    parser.add_argument("--scale-rewards", default="group")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2 with 2 devices")
    parser.add_argument("--fsdp1", action="store_true", help="FSDP1 (Lightning's FSDPStrategy) instead of FSDP2")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    parser.add_argument("--sharded-load", action="store_true", help="meta-device model, weights loaded after sharding")
    parser.add_argument("--generation-check", type=int, default=0, metavar="PORT",
                        help="only check generation under FSDP2 with 2 ranks, using this TCP port")
    parser.add_argument("--fsdp1-check", type=int, default=0, metavar="PORT",
                        help="only check the FSDP1 helpers on raw FullyShardedDataParallel, 2 ranks, this TCP port")
    args = parser.parse_args()
    out = Path(args.out)
    if args.generation_check:
        generation_check(args.out, args.generation_check)
        return
    if args.fsdp1_check:
        torch.multiprocessing.spawn(_fsdp1_worker, args=(2, args.fsdp1_check, args.out), nprocs=2, join=True)
        return
    L.seed_everything(0)
    record = RecordLosses()
    module, data = build(args)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    fit = trainer(args, args.steps, [record, ckpt], module)
    fit.fit(module, data)
    grad_norms = []
    if args.resume_steps:
        grad_norms = module.grad_norms
        module, data = build(args)
        fit = trainer(args, args.resume_steps, [record], module)
        fit.fit(module, data, ckpt_path=str(out / "ckpt" / "last.ckpt"))
    rank = fit.global_rank
    state = fsdp.full_state_dict(module.model)
    if rank == 0 or args.ddp:  # DDP: every rank's replica, to check they stayed in sync
        name = f"params_rank{rank}.pt" if args.ddp and rank else "params.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / name)
    info = {"losses": record.losses, "kl": record.kl, "advantages": getattr(module, "advantages", []),
            "grad_norms": grad_norms + getattr(module, "grad_norms", []),
            "full_loads": SeededGRPO.full_loads,
            "reference_sharded": None if module.reference_model is None else fsdp.is_sharded(module.reference_model), "global_step": fit.global_step, "world_size": fit.world_size,
            "pid": os.getpid(), "sharded": fsdp.is_sharded(module.model), "model_class": type(module.model).__name__,
            "lightning_module_wrapped": fit.strategy.model is not module,
            "param_groups": [len(g["params"]) for g in fit.optimizers[0].param_groups]}  # weight decay: >= 2-D or not
    if args.lora:
        info["reference"] = reference_check(module)
    (out / f"losses_rank{rank}.json").write_text(json.dumps(info))
    if args.devices == 2 and not args.ddp:
        module.export_hf(out / "hf_model")


def reference_check(module) -> dict:
    """How far the adapter-disabled model (GRPO's reference under LoRA) and the trained policy are from the
    starting model, in logits on a fixed input; runs on every rank (a sharded forward is collective)."""
    from aesl_lightning.infra.models import load_causal_lm

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model = module.model.eval()
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with adapters_disabled(fsdp.unwrap(model)):
            reference = model(input_ids=ids).logits
        start = load_causal_lm("tiny-llama").eval()(input_ids=ids).logits
    return {"reference_vs_start": (reference - start).abs().max().item(),
            "policy_vs_start": (policy - start).abs().max().item()}


def _sampled_sharded_and_plain(model, plain, tokenizer, prompt, rank: int) -> list:
    """3 seeded samples of the prompt from the sharded model (inside `unsharded_for_generation`) and from the plain
    one: k samples share one prefill of the prompt (a forward outside `generate`), so the tokens must match too."""
    from aesl_lightning.infra.fsdp import unsharded_for_generation
    from aesl_lightning.infra.generation import SamplingConfig

    sampling = SamplingConfig(3, 1.0, 1.0, max_new_tokens=4 + 6 * rank)
    samples = []
    for target in (model, plain):
        torch.manual_seed(7 + rank)
        with unsharded_for_generation(model) if target is model else nullcontext():
            samples.append(generate(target, tokenizer, prompt["input_ids"], prompt["attention_mask"], sampling).completion_ids)
    return samples


def _generation_worker(rank: int, world: int, port: int, out: str) -> None:
    """Shard tiny-llama over 2 gloo ranks and generate different lengths per rank inside
    `unsharded_for_generation`; the tokens must equal the unsharded model's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from aesl_lightning.infra.fsdp import shard_model, unsharded_for_generation
    from aesl_lightning.infra.generation import SamplingConfig
    from aesl_lightning.infra.models import load_causal_lm, load_tokenizer

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
    samples = _sampled_sharded_and_plain(model, plain, tokenizer, prompt, rank)
    # afterwards the parameters are sharded again and a training forward/backward still works
    resharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    model.train()
    model(input_ids=prompt["input_ids"], labels=prompt["input_ids"]).loss.backward()
    result = {"rank": rank, "length": sharded.completion_ids.shape[1], "resharded": resharded,
              "equal": torch.equal(sharded.completion_ids, expected.completion_ids),
              "samples_equal": torch.equal(samples[0], samples[1]), "samples_shape": list(samples[0].shape)}
    Path(out, f"generation_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears its gloo connections down while the other still uses them
    dist.destroy_process_group()


def generation_check(out: str, port: int) -> None:
    torch.multiprocessing.spawn(_generation_worker, args=(2, port, out), nprocs=2, join=True)


@contextmanager
def _count_collectives(counter: list):
    """Count the collectives torch.distributed runs within the block (FSDP1 calls them through the module)."""
    import torch.distributed as dist

    names = ["all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor", "all_reduce",
             "broadcast"]
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            counter.append(name)
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _fsdp1_worker(rank: int, world: int, port: int, out: str) -> None:
    """Wrap tiny-llama in raw FSDP1 (each decoder layer a unit, the root the rest) over 2 gloo ranks and check
    the helpers: generation of different lengths per rank without moving weights, resharding afterwards, a
    training step, the gathered state dict and its export."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM

    from aesl_lightning.infra.export import export_state_dict
    from aesl_lightning.infra.fsdp import unsharded_for_generation
    from aesl_lightning.infra.generation import SamplingConfig
    from aesl_lightning.infra.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokenizer = load_tokenizer("tiny-llama")
    plain = load_causal_lm("tiny-llama").eval()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    inner = load_causal_lm("tiny-llama").eval()
    model = FullyShardedDataParallel(inner, auto_wrap_policy=ModuleWrapPolicy(fsdp.decoder_layer_classes(inner)),
                                     use_orig_params=True, device_id=torch.device("cpu"))
    result = {"rank": rank, "sharded": fsdp.is_sharded(model) and fsdp.is_sharded(inner),
              "unwrap": fsdp.unwrap(model) is inner, "roots": len(fsdp.fsdp1_roots(model)),
              "units": sum(isinstance(m, FullyShardedDataParallel) for m in model.modules())}
    full_numel = sum(p.numel() for p in plain.parameters())
    result["local_fraction"] = sum(p.numel() for p in model.parameters()) / full_numel

    prompt = tokenizer(["What is 2+3?"], return_tensors="pt")
    greedy = SamplingConfig(1, 0.0, 1.0, max_new_tokens=3 + 17 * rank)  # rank 0 stops long before rank 1
    collectives: list = []
    with unsharded_for_generation(model):
        result["gathered_fraction"] = sum(p.numel() for p in inner.parameters()) / full_numel
        with _count_collectives(collectives):
            sharded = generate(model, tokenizer, prompt["input_ids"], prompt["attention_mask"], greedy)
    expected = generate(plain, tokenizer, prompt["input_ids"], prompt["attention_mask"], greedy)
    samples = _sampled_sharded_and_plain(model, plain, tokenizer, prompt, rank)
    result.update(length=sharded.completion_ids.shape[1], collectives=sorted(set(collectives)),
                  equal=torch.equal(sharded.completion_ids, expected.completion_ids),
                  samples_equal=torch.equal(samples[0], samples[1]),
                  resharded_fraction=sum(p.numel() for p in model.parameters()) / full_numel,
                  forwards_restored=not any("forward" in m.__dict__ for m in model.modules()))

    seen: list = []  # the counter does see FSDP1's all-gathers: a plain sharded forward
    with _count_collectives(seen), torch.no_grad():
        model(input_ids=prompt["input_ids"])
    result["counter_sees_all_gather"] = any("gather" in name for name in seen)  # gloo: all_gather of a list

    # a training forward / backward through the root still works and matches the unsharded model
    model.train()
    loss = model(input_ids=prompt["input_ids"], labels=prompt["input_ids"]).loss
    loss.backward()
    result["loss_diff"] = abs(loss.item() - plain(input_ids=prompt["input_ids"], labels=prompt["input_ids"]).loss.item())

    state = fsdp.full_state_dict(model)  # rank 0 only
    everywhere = fsdp.full_state_dict(model, cpu_offload=False)
    result["state_keys"] = len(state)
    result["everywhere_equal"] = set(everywhere) == set(start) and all(torch.equal(everywhere[k], start[k]) for k in start)
    if rank == 0:
        result["state_equal"] = set(state) == set(start) and all(torch.equal(state[k], start[k]) for k in start)
        export_state_dict(state, inner.config, tokenizer, Path(out, "hf_model"), generation_config=inner.generation_config)
        reloaded = AutoModelForCausalLM.from_pretrained(Path(out, "hf_model")).state_dict()
        result["export_equal"] = all(torch.equal(reloaded[k], start[k]) for k in start)
    dist.barrier()
    Path(out, f"fsdp1_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
