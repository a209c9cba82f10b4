"""SFT on tiny-llama with FSDP2 (or FSDP1) over gloo, 2 CPU processes; run by tests/test_fsdp_sft.py.

    python tests/_fsdp_sft_script.py --out DIR
    python tests/_fsdp_sft_script.py --fsdp1 --out DIR    # Lightning's FSDPStrategy, gradient clipping by norm
    python tests/_fsdp_sft_script.py --devices 1 [--clip 1.0] --out DIR    # the same run in one process

Trains 4 steps with validation (loss, KL to the start, greedy and sampled generation) every 2 steps and the
Hugging Face export at the end; rank 0 writes `metrics.json` (with each step's global loss and gradient norm
before clipping) and `grads.pt` (each step's full gradient before clipping and the optimiser; not under FSDP1,
whose flat shards lose the parameter names); the export goes to `DIR/hf_model`. The global batch is 4 examples in
the same order whatever the number of processes (no shuffling: rank r takes examples r, r + 2 of each 4).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, whatever is pip-installed
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _fsdp_script

import lightning as L  # noqa: E402
from _fsdp_script import CPUFSDPStrategy, global_grad_norm  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402

from aesl_lightning.training.callbacks import HFExport  # noqa: E402
from aesl_lightning.training.early_stopping import DiversityEarlyStopping  # noqa: E402
from aesl_lightning.data import SFTDataModule  # noqa: E402
from aesl_lightning.data.synthetic import ArithmeticConfig  # noqa: E402
from aesl_lightning.infra.fsdp import is_sharded  # noqa: E402
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration  # noqa: E402


class RecordedSFT(SFTModule):
    """SFT that records, per optimiser step, the global loss sum_t m l / N over all ranks and the gradient that
    reaches clipping (after the rescaling by the step's token count): its norm, and its full tensors by name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses, self.grad_norms, self.grads = [], [], []
        self._loss_sum = 0.0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)  # this rank's sum of token losses (normalised later)
        self._loss_sum += float(loss.detach())
        return loss

    def on_train_start(self) -> None:
        # the examples each rank trains on, in order (Lightning's distributed sampler decides): the one-process
        # run replays them as its batches (`--order`)
        order = [int(i) for i in self.trainer.train_dataloader.sampler]
        self.rank_orders = [order]
        if dist.is_available() and dist.is_initialized():
            self.rank_orders = [None] * dist.get_world_size()
            dist.all_gather_object(self.rank_orders, order)

    def global_order(self, per_rank: int) -> list[int]:
        """The examples of each global batch, step after step: rank 0's share, then rank 1's."""
        steps = len(self.rank_orders[0]) // per_rank
        return [i for s in range(steps) for order in self.rank_orders for i in order[s * per_rank:(s + 1) * per_rank]]

    def on_before_optimizer_step(self, optimizer) -> None:
        sums = torch.tensor([self._loss_sum, float(self._step_tokens)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        self.losses.append((sums[0] / sums[1]).item())
        self._loss_sum = 0.0
        super().on_before_optimizer_step(optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.grad_norms.append(global_grad_norm(self.model))
        if not isinstance(self.model, FullyShardedDataParallel):
            self.grads.append({name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                               for name, p in self.model.named_parameters() if p.grad is not None})
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp1", action="store_true", help="FSDP1 (Lightning's FSDPStrategy) instead of FSDP2")
    parser.add_argument("--num-prompts", type=int, default=4, help="validation prompts (1: rank 1 generates nothing)")
    parser.add_argument("--devices", type=int, default=2, help="1: the same run in one process, no FSDP")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val (default: 1.0 with --fsdp1, else none)")
    parser.add_argument("--order", type=Path, default=None, help="metrics.json of a 2-process run: train on its batches")
    args = parser.parse_args()
    clip = args.clip if args.clip is not None else (1.0 if args.fsdp1 else None)
    L.seed_everything(0)
    module = RecordedSFT("tiny-llama", lr=3e-3, warmup_steps=0,
                       val_generation=ValidationGeneration(num_prompts=args.num_prompts, num_samples=2, max_new_tokens=8))
    # FSDP1 without an auto_wrap_policy: configure_model makes each decoder layer a unit
    strategy = CPUFSDPStrategy() if args.fsdp1 else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy if args.devices > 1 else "auto", gradient_clip_val=clip,
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        # FSDP1 on CPU cannot write the full checkpoints the peak needs (torch 2.13 segfaults): the peak is tested on FSDP2
        callbacks=[HFExport(dirpath=str(args.out / "hf_model"))] + ([] if args.fsdp1 else [
            DiversityEarlyStopping(monitor="val/gen_entropy", stop=False, dirpath=str(args.out / "turning_point"))]),
    )
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=16, seed=1, max_steps=1),
                         val_size=4, batch_size=4 // args.devices, max_length=400, shuffle=False)
    if args.order is not None:  # the global batches of the 2-process run, in its order
        data.attach_tokenizer(module.tokenizer)
        data.setup("fit")
        data.train_data = [data.train_data[i] for i in json.loads(args.order.read_text())["order"]]
    trainer.fit(module, data)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (args.out / "metrics.json").write_text(json.dumps(
            {"step": trainer.global_step, "sharded": is_sharded(module.model), "metrics": metrics,
             "model_class": type(module.model).__name__, "lightning_module_wrapped": trainer.strategy.model is not module,
             "losses": module.losses, "grad_norms": module.grad_norms, "order": module.global_order(data.batch_size)}))
        torch.save(module.grads, args.out / "grads.pt")


if __name__ == "__main__":
    main()
