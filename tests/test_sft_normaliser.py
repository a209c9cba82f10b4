"""The SFT objective is sum_t m w l / N with N the completion tokens of the whole optimiser step over all ranks:
gradient accumulation and data parallelism give the gradient of one big batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from aesl_lightning.data import SFTDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.maths.losses import LossConfig
from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

ROOT = Path(__file__).resolve().parent.parent


class GradRecorder(SFTModule):
    """Records the full gradient that reaches clipping (after the step's rescaling), once per optimiser step."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("val_generation", ValidationGeneration(num_prompts=0))
        super().__init__(*args, **kwargs)
        self.recorded: list[dict[str, torch.Tensor]] = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.detach().clone().cpu()
        self.recorded.append(grads)


def data_module(num_examples: int, batch_size: int) -> SFTDataModule:
    # completions of different lengths, so a mean of per-micro-batch means would differ from the token mean
    return SFTDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=num_examples, seed=3, max_steps=3),
                         val_size=0, batch_size=batch_size, max_length=400, shuffle=False)


def _fit(tmp_path, loss: str, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = GradRecorder("tiny-llama", lr=1e-3, warmup_steps=0, loss=LossConfig(name=loss, tau_tok=0.02, tau_seq=0.5), gate_check_batches=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data_module(8, batch_size))
    assert len(module.recorded) == 1
    return module.recorded[0]


def _direct(loss: str) -> dict[str, torch.Tensor]:
    """The gradient of sft_loss on all 8 examples in one batch, by plain autograd."""
    L.seed_everything(0)
    module = SFTModule("tiny-llama", loss=LossConfig(name=loss, tau_tok=0.02, tau_seq=0.5), val_generation=ValidationGeneration(num_prompts=0))
    data = data_module(8, 8)
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.compute_loss(batch).loss.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss", ["ce", "aesl"])
def test_accumulating_four_micro_batches_gives_the_gradient_of_one_batch_four_times_larger(tmp_path, loss):
    direct = _direct(loss)
    _assert_same(_fit(tmp_path, loss, batch_size=8, accumulate=1), direct)
    _assert_same(_fit(tmp_path, loss, batch_size=2, accumulate=4), direct)


@pytest.mark.distributed
def test_two_processes_give_the_gradient_of_one(tmp_path):
    out = tmp_path / "grads.pt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "_sft_grad_script.py"), "--out", str(out), "--loss", "aesl"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    recorded = torch.load(out, weights_only=True)
    assert len(recorded) == 1
    _assert_same(recorded[0], _direct("aesl"))
