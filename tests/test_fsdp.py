"""FSDP2 over gloo with 2 CPU processes: GRPO matches the single-process run; generation, resume, export.

The multi-process runs live in `tests/_fsdp_script.py` (Lightning launches its own subprocesses from a
script); each writes JSON and tensors that these tests compare.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aesl_lightning.fsdp import decoder_layers, full_state_dict, is_sharded, unsharded_for_generation
from aesl_lightning.models import load_causal_lm

SCRIPT = Path(__file__).with_name("_fsdp_script.py")
ROOT = SCRIPT.parent.parent


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_weights_close(got, expected):
    # Adam divides by sqrt(v): an entry with a near-zero gradient turns float reduction-order noise into
    # ~1e-5 of a 1e-3 step (measured 1.2e-5 max, 2e-8 mean); a lost or double-counted gradient moves
    # whole tensors by about a step.
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0, msg=key)
        assert (got[key] - expected[key]).abs().mean() < 1e-6, key


def _losses(folder, ranks):
    return [json.loads((folder / f"losses_rank{r}.json").read_text())["losses"] for r in range(ranks)]


def test_decoder_layers_and_helpers_on_an_unsharded_model():
    model = load_causal_lm("tiny-llama")
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert not is_sharded(model)
    with unsharded_for_generation(model) as same:  # no FSDP units: a no-op
        assert same is model
    state = full_state_dict(model)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.distributed
def test_generation_under_fsdp_with_different_lengths_per_rank(tmp_path):
    """Rank 0 stops after 3 tokens, rank 1 after 20: no deadlock, same tokens as the unsharded model,
    parameters sharded again afterwards."""
    _run("--generation-check", _free_port(), "--out", tmp_path, timeout=180)
    results = [json.loads((tmp_path / f"generation_rank{r}.json").read_text()) for r in range(2)]
    assert [r["length"] for r in results] == [3, 20]
    assert all(r["equal"] and r["resharded"] for r in results)


@pytest.mark.distributed
def test_grpo_fsdp_two_processes_match_one_process_with_resume_and_export(tmp_path):
    """3 GRPO steps (beta > 0, grad clipping) in one process == 2 steps on 2 FSDP2 ranks, a sharded
    checkpoint, and a resumed third step: same losses and weights; the gathered export reloads."""
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    _run("--devices", 1, "--steps", 3, "--out", single)
    _run("--devices", 2, "--steps", 2, "--resume-steps", 3, "--out", sharded)

    (reference,) = _losses(single, 1)
    per_rank = _losses(sharded, 2)
    assert len(reference) == 3 and all(len(r) == 3 for r in per_rank)
    # grpo aggregation is a mean over sequences and each rank holds half of them: the global loss is the rank mean
    mean_over_ranks = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert mean_over_ranks == pytest.approx(reference, abs=2e-6)
    assert reference[-1] != 0.0

    assert (sharded / "ckpt" / "last.ckpt").is_dir()  # sharded checkpoint: one file per rank + metadata
    assert len(list((sharded / "ckpt" / "last.ckpt").glob("*.distcp"))) == 2

    expected, got = torch.load(single / "params.pt"), torch.load(sharded / "params.pt")
    start = load_causal_lm("tiny-llama").state_dict()
    assert max((expected[k] - start[k]).abs().max().item() for k in expected) > 2e-3  # training moved them
    _assert_weights_close(got, expected)

    exported = AutoModelForCausalLM.from_pretrained(sharded / "hf_model").state_dict()
    for key, value in got.items():
        assert torch.equal(exported[key], value), key


@pytest.mark.distributed
def test_dapo_with_two_inner_iterations_matches_one_process_under_fsdp_and_ddp(tmp_path):
    """mu = 2 (old log-probs from generation time) and dapo's global token normaliser: 2 ranks == 1 process."""
    options = ["--num-iterations", 2, "--loss-type", "dapo", "--steps", 4]
    _run("--devices", 1, *options, "--out", tmp_path / "single")
    (reference,) = _losses(tmp_path / "single", 1)
    assert len(reference) == 2  # 4 optimiser steps = 2 batches of rollouts x mu 2
    expected = torch.load(tmp_path / "single" / "params.pt")
    for name, extra in (("fsdp", []), ("ddp", ["--ddp"])):
        _run("--devices", 2, *options, *extra, "--out", tmp_path / name)
        per_rank = _losses(tmp_path / name, 2)
        assert [(a + b) / 2 for a, b in zip(*per_rank)] == pytest.approx(reference, abs=2e-6), name
        _assert_weights_close(torch.load(tmp_path / name / "params.pt"), expected)
    replica = torch.load(tmp_path / "ddp" / "params_rank1.pt")  # DDP replicas stayed in sync
    assert all(torch.equal(replica[k], v) for k, v in torch.load(tmp_path / "ddp" / "params.pt").items())
