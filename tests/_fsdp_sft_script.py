"""SFT on tiny-llama with FSDP2 (or FSDP1) over gloo, 2 CPU processes; run by tests/test_fsdp_sft.py.

    python tests/_fsdp_sft_script.py --out DIR
    python tests/_fsdp_sft_script.py --fsdp1 --out DIR    # Lightning's FSDPStrategy, gradient clipping by norm

Trains 4 steps with validation (loss, KL to the start, greedy and sampled generation) every 2 steps and the
Hugging Face export at the end; rank 0 writes `metrics.json` and the export goes to `DIR/hf_model`.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, whatever is pip-installed
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _fsdp_script

import lightning as L  # noqa: E402
from _fsdp_script import CPUFSDPStrategy  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from aesl_lightning.callbacks import HFExport  # noqa: E402
from aesl_lightning.early_stopping import DiversityEarlyStopping  # noqa: E402
from aesl_lightning.data import SFTDataModule  # noqa: E402
from aesl_lightning.data.synthetic import ArithmeticConfig  # noqa: E402
from aesl_lightning.fsdp import is_sharded  # noqa: E402
from aesl_lightning.sft import SFTModule, ValidationGeneration  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp1", action="store_true", help="FSDP1 (Lightning's FSDPStrategy) instead of FSDP2")
    parser.add_argument("--num-prompts", type=int, default=4, help="validation prompts (1: rank 1 generates nothing)")
    args = parser.parse_args()
    L.seed_everything(0)
    module = SFTModule("tiny-llama", lr=3e-3, warmup_steps=0,
                       val_generation=ValidationGeneration(num_prompts=args.num_prompts, num_samples=2, max_new_tokens=8))
    # FSDP1 without an auto_wrap_policy: configure_model makes each decoder layer a unit
    strategy = CPUFSDPStrategy() if args.fsdp1 else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, gradient_clip_val=1.0 if args.fsdp1 else None,
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        # FSDP1 on CPU cannot write the full checkpoints the peak needs (torch 2.13 segfaults): the peak is tested on FSDP2
        callbacks=[HFExport(dirpath=str(args.out / "hf_model"))] + ([] if args.fsdp1 else [
            DiversityEarlyStopping(monitor="val/gen_entropy", stop=False, dirpath=str(args.out / "turning_point"))]),
    )
    data = SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=16, seed=1, max_steps=1),
                         val_size=4, batch_size=2, max_length=400)
    trainer.fit(module, data)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (args.out / "metrics.json").write_text(json.dumps(
            {"step": trainer.global_step, "sharded": is_sharded(module.model), "metrics": metrics,
             "model_class": type(module.model).__name__, "lightning_module_wrapped": trainer.strategy.model is not module}))


if __name__ == "__main__":
    main()
