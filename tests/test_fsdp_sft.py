"""SFTModule under FSDP2 (ModelParallelStrategy) and FSDP1 (FSDPStrategy), 2 CPU processes over gloo:
trains like one process (the same loss, gradient before clipping and the optimiser, and weights at every step),
validates with generation on unsharded weights (ranks generate different lengths), and exports the gathered
weights."""

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
    """Each step's loss and full gradient (before the optimiser), and the final weights, equal one process's."""
    result = _check_sft_run(tmp_path / "fsdp")
    single = _run(tmp_path / "single", "--devices", "1", "--order", tmp_path / "fsdp" / "metrics.json")
    _assert_same_training(tmp_path / "fsdp", result, tmp_path / "single", single)
    from aesl_lightning.infra.models import load_causal_lm

    names = {name for name, _ in load_causal_lm("tiny-llama").named_parameters()}
    got = torch.load(tmp_path / "fsdp" / "grads.pt", weights_only=True)
    expected = torch.load(tmp_path / "single" / "grads.pt", weights_only=True)
    assert len(got) == len(expected) == 4
    for step, (g, e) in enumerate(zip(got, expected)):
        assert set(g) == set(e) == names
        for name in e:
            torch.testing.assert_close(g[name], e[name], rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}")


@pytest.mark.distributed
def test_sft_trains_validates_and_exports_under_fsdp1_with_norm_clipping(tmp_path):
    """FSDPStrategy with Trainer(gradient_clip_val=1.0), which Lightning's FSDP precision plugin refuses by
    itself: CausalLMModule clips with the FSDP1 root's clip_grad_norm_. Each step's loss and gradient norm before
    clipping, and the final weights, equal one process's with the same clipping."""
    result = _check_sft_run(tmp_path / "fsdp1", "--fsdp1")
    assert result["model_class"] == "FullyShardedDataParallel" and not result["lightning_module_wrapped"]
    single = _run(tmp_path / "single", "--devices", "1", "--clip", "1.0", "--order", tmp_path / "fsdp1" / "metrics.json")
    _assert_same_training(tmp_path / "fsdp1", result, tmp_path / "single", single)


@pytest.mark.distributed
def test_validation_with_fewer_prompts_than_ranks_does_not_hang(tmp_path):
    """One prompt on two ranks: rank 1 generates nothing and has no scored samples, yet must enter every metric
    sync that rank 0 enters (before the fix the ranks disagreed on which metrics to compute and waited forever)."""
    result = _check_sft_run(tmp_path, "--num-prompts", "1")
    assert "val/answer_accuracy" in result["metrics"] and "val/pass@2" in result["metrics"]


def load_causal_lm_state(name: str) -> dict:
    from aesl_lightning.infra.models import load_causal_lm

    return load_causal_lm(name).state_dict()


def _run(out, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return json.loads((out / "metrics.json").read_text())


def _assert_same_training(folder, result, single_folder, single) -> None:
    """Loss and gradient norm (before clipping: clipping and AdamW would hide a uniformly scaled gradient) at each
    of the 4 steps, and the exported weights, as in one process. Weights at AdamW's tolerance: an entry with a
    near-zero gradient turns reduction-order noise into a visible fraction of a step."""
    from transformers import AutoModelForCausalLM

    assert single["step"] == 4 and not single["sharded"]
    assert sorted(result["order"]) == list(range(16)) and single["order"] == list(range(16))  # replayed in order
    assert len(single["losses"]) == len(single["grad_norms"]) == 4 and all(n > 0 for n in single["grad_norms"])
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert result["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-4)
    got = AutoModelForCausalLM.from_pretrained(folder / "hf_model").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(single_folder / "hf_model").state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0, msg=key)
        assert (got[key] - expected[key]).abs().mean() < 1e-6, key


def _check_sft_run(tmp_path, *args) -> dict:
    from transformers import AutoModelForCausalLM

    result = _run(tmp_path, *args)
    assert result["step"] == 4 and result["sharded"]
    metrics = result["metrics"]
    for key in ["train/loss", "val/loss", "val/kl_to_base", "val/answer_accuracy", "val/self_bleu", "val/gen_entropy"]:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["val/kl_to_base"] > 0  # the weights moved away from the start
    from aesl_lightning.infra.models import load_causal_lm

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
