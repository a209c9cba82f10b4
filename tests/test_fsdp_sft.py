"""SFTModule under FSDP2 (ModelParallelStrategy) and FSDP1 (FSDPStrategy), 2 CPU processes over gloo:
trains, validates with generation on unsharded weights (ranks generate different lengths), and exports the
gathered weights."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_fsdp_sft_script.py")
ROOT = SCRIPT.parent.parent


@pytest.mark.distributed
def test_sft_trains_validates_and_exports_under_fsdp2(tmp_path):
    _check_sft_run(tmp_path)


@pytest.mark.distributed
def test_sft_trains_validates_and_exports_under_fsdp1_with_norm_clipping(tmp_path):
    """FSDPStrategy with Trainer(gradient_clip_val=1.0), which Lightning's FSDP precision plugin refuses by
    itself: CausalLMModule clips with the FSDP1 root's clip_grad_norm_."""
    result = _check_sft_run(tmp_path, "--fsdp1")
    assert result["model_class"] == "FullyShardedDataParallel" and not result["lightning_module_wrapped"]


@pytest.mark.distributed
def test_validation_with_fewer_prompts_than_ranks_does_not_hang(tmp_path):
    """One prompt on two ranks: rank 1 generates nothing and has no scored samples, yet must enter every metric
    sync that rank 0 enters (before the fix the ranks disagreed on which metrics to compute and waited forever)."""
    result = _check_sft_run(tmp_path, "--num-prompts", "1")
    assert "val/answer_accuracy" in result["metrics"] and "val/pass@2" in result["metrics"]


def load_causal_lm_state(name: str) -> dict:
    from aesl_lightning.models import load_causal_lm

    return load_causal_lm(name).state_dict()


def _check_sft_run(tmp_path, *args) -> dict:
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["step"] == 4 and result["sharded"]
    metrics = result["metrics"]
    for key in ["train/loss", "val/loss", "val/kl_to_base", "val/answer_accuracy", "val/self_bleu", "val/gen_entropy"]:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["val/kl_to_base"] > 0  # the weights moved away from the start
    from aesl_lightning.models import load_causal_lm

    if "--fsdp1" not in args:
        # the diversity peak is exported in Hugging Face format in the sharded case too (the RL stage's input)
        peak = AutoModelForCausalLM.from_pretrained(tmp_path / "turning_point" / "hf_model")
        assert json.loads((tmp_path / "turning_point" / "turning_point.json").read_text())["peak"] is not None
        assert set(peak.state_dict()) == set(load_causal_lm_state("tiny-llama"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model")
    start = load_causal_lm("tiny-llama")
    exported, initial = model.state_dict(), start.state_dict()
    assert set(exported) == set(initial)
    # the gathered export holds full (not sharded) tensors, moved by training in every layer
    for key in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]:
        assert exported[key].shape == initial[key].shape
        assert not torch.allclose(exported[key], initial[key]), key
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > 4
    return result
