"""One SFT optimiser step of tiny-llama over 2 gloo CPU processes (FSDP2); rank 0 saves the full gradient.

    python tests/_sft_grad_script.py --out grads.pt --loss aesl --num-examples 8 --batch-size 4

Run by tests/test_sft_normaliser.py, which compares the gradient with one process over the same 8 examples.
"""

import argparse
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from test_sft_normaliser import GradRecorder, data_module  # noqa: E402

from aesl_lightning.maths.losses import LossConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loss", default="aesl")
    parser.add_argument("--num-examples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    L.seed_everything(0)
    module = GradRecorder("tiny-llama", lr=1e-3, warmup_steps=0, loss=LossConfig(name=args.loss, tau_tok=0.02, tau_seq=0.5),
                          gate_check_batches=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data_module(args.num_examples, args.batch_size))
    if trainer.is_global_zero:
        torch.save(module.recorded, args.out)


if __name__ == "__main__":
    main()
