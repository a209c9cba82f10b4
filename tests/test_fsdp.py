"""FSDP2 and FSDP1 over gloo with 2 CPU processes: GRPO (full or LoRA) matches the single-process run;
generation, resume, export.

The multi-process runs live in `tests/_fsdp_script.py` (Lightning launches its own subprocesses from a
script); each writes JSON and tensors that these tests compare. Lightning's FSDPStrategy (FSDP1) refuses
CPUs; the script's `CPUFSDPStrategy` lifts that for the tests.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aesl_lightning.infra.fsdp import (
    decoder_layer_classes,
    decoder_layers,
    fsdp1_roots,
    full_state_dict,
    is_sharded,
    unsharded_for_generation,
    unwrap,
)
from aesl_lightning.infra.models import load_causal_lm

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


def _assert_same_gradients(folder, ranks, single):
    """The global gradient norm before clipping, step by step, on every rank == one process's: clipping (active
    here, norms > 1.0) and AdamW both normalise a uniformly scaled gradient away, so losses and weights alone would
    pass a gradient 2x too large or too small. Relative 1e-4: later steps start from weights that AdamW's
    reduction-order noise has moved by ~1e-5."""
    expected = json.loads((single / "losses_rank0.json").read_text())["grad_norms"]
    assert expected and all(n > 0 for n in expected)
    for r in range(ranks):
        got = json.loads((folder / f"losses_rank{r}.json").read_text())["grad_norms"]
        assert got == pytest.approx(expected, rel=1e-4), (r, got, expected)


def _losses(folder, ranks):
    return [json.loads((folder / f"losses_rank{r}.json").read_text())["losses"] for r in range(ranks)]


def test_decoder_layers_and_helpers_on_an_unsharded_model():
    model = load_causal_lm("tiny-llama")
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert decoder_layer_classes(model) == {type(layers[0])}
    assert not is_sharded(model) and fsdp1_roots(model) == [] and unwrap(model) is model
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
    # sampled with a prefill shared by the 3 samples of the prompt, under FSDP2 as without it
    assert all(r["samples_equal"] for r in results) and [r["samples_shape"][0] for r in results] == [3, 3]


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
    _assert_same_gradients(sharded, 2, single)


@pytest.mark.distributed
@pytest.mark.parametrize("lora", [False, True])
def test_sharded_load_builds_on_meta_and_only_rank_0_reads_the_weights(tmp_path, lora):
    """sharded_load: every rank builds the model on the meta device, FSDP2 shards it, rank 0 alone reads the
    starting weights and broadcasts each rank its shards; so for the frozen reference of full fine-tuning
    (beta > 0), which is sharded too. Two such ranks train exactly like one ordinary process (the KL to the
    reference is in the loss)."""
    extra = ["--lora"] if lora else []
    _run("--devices", 1, "--steps", 2, *extra, "--out", tmp_path / "single")
    _run("--devices", 2, "--steps", 2, "--sharded-load", *extra, "--out", tmp_path / "meta")
    info = [json.loads((tmp_path / "meta" / f"losses_rank{r}.json").read_text()) for r in range(2)]
    # rank 0 reads the policy's weights (and, fully fine-tuned, the reference's) once each; rank 1 never
    assert [i["full_loads"] for i in info] == ([1, 0] if lora else [2, 0]) and all(i["sharded"] for i in info)
    assert [i["reference_sharded"] for i in info] == ([None, None] if lora else [True, True])
    per_rank = _losses(tmp_path / "meta", 2)
    assert [(a + b) / 2 for a, b in zip(*per_rank)] == pytest.approx(_losses(tmp_path / "single", 1)[0], abs=2e-6)
    _assert_weights_close(torch.load(tmp_path / "meta" / "params.pt"), torch.load(tmp_path / "single" / "params.pt"))
    _assert_same_gradients(tmp_path / "meta", 2, tmp_path / "single")


@pytest.mark.distributed
def test_batch_scaled_advantages_on_two_processes_equal_one_process(tmp_path):
    """scale_rewards: batch divides by the std of the whole global batch (gathered over ranks, as TRL does), so
    each prompt's advantages, the losses and the weights on 2 DDP ranks equal one process's."""
    options = ["--scale-rewards", "batch", "--steps", 2]
    _run("--devices", 1, *options, "--out", tmp_path / "single")
    _run("--devices", 2, *options, "--ddp", "--out", tmp_path / "ddp")
    info = lambda folder, r: json.loads((folder / f"losses_rank{r}.json").read_text())  # noqa: E731
    (expected,) = [info(tmp_path / "single", 0)["advantages"]]
    ranks = [info(tmp_path / "ddp", r)["advantages"] for r in range(2)]
    for step, want in enumerate(expected):
        got = {**ranks[0][step], **ranks[1][step]}
        assert set(got) == set(want) and len(want) == 4
        for prompt in want:
            assert got[prompt] == pytest.approx(want[prompt], abs=1e-6), (step, prompt)
    # (checked to fail with a rank-local std: every advantage of every prompt differs)
    per_rank = _losses(tmp_path / "ddp", 2)
    assert [(a + b) / 2 for a, b in zip(*per_rank)] == pytest.approx(_losses(tmp_path / "single", 1)[0], abs=2e-6)
    _assert_weights_close(torch.load(tmp_path / "ddp" / "params.pt"), torch.load(tmp_path / "single" / "params.pt"))
    _assert_same_gradients(tmp_path / "ddp", 2, tmp_path / "single")


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
        _assert_same_gradients(tmp_path / name, 2, tmp_path / "single")
    replica = torch.load(tmp_path / "ddp" / "params_rank1.pt")  # DDP replicas stayed in sync
    assert all(torch.equal(replica[k], v) for k, v in torch.load(tmp_path / "ddp" / "params.pt").items())


def test_wrap_fsdp1_outside_an_enable_wrap_context_says_so():
    from aesl_lightning.infra.fsdp import wrap_fsdp1

    with pytest.raises(RuntimeError, match="enable_wrap"):
        wrap_fsdp1(load_causal_lm("tiny-llama"))


def test_fsdp1_strategy_refuses_use_orig_params_false():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from aesl_lightning.modules.lm import CausalLMModule

    module = CausalLMModule("tiny-llama")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False))
    with pytest.raises(ValueError, match="use_orig_params=False"):
        module.configure_model()
    assert not is_sharded(module.model)


@pytest.mark.distributed
def test_fsdp1_helpers_on_raw_fully_sharded_data_parallel(tmp_path):
    """Raw FSDP1 (each decoder layer a unit, root = the model): generation of 3 and 20 tokens on the two
    ranks moves no weights (only transformers' per-token "all done" flag is all-reduced) and matches the
    unsharded model; the units reshard afterwards; the gathered state dict (rank 0) and its export equal the
    start weights."""
    _run("--fsdp1-check", _free_port(), "--out", tmp_path, timeout=180)
    results = [json.loads((tmp_path / f"fsdp1_rank{r}.json").read_text()) for r in range(2)]
    assert [r["length"] for r in results] == [3, 20]
    for r in results:
        assert r["sharded"] and r["unwrap"] and r["roots"] == 1 and r["units"] == 3
        assert r["local_fraction"] == pytest.approx(0.5, abs=0.01) and r["gathered_fraction"] == 1.0
        # no all-gather: the weights stayed put (all_reduce: transformers' synced_gpus flag, once per token)
        assert r["equal"] and r["samples_equal"] and set(r["collectives"]) <= {"all_reduce"} and r["counter_sees_all_gather"]
        assert r["resharded_fraction"] == r["local_fraction"] and r["forwards_restored"]
        assert r["loss_diff"] < 1e-5 and r["everywhere_equal"]
    assert results[0]["state_keys"] == 21 and results[0]["state_equal"] and results[0]["export_equal"]
    assert results[1]["state_keys"] == 0  # rank 0 only


@pytest.mark.distributed
def test_grpo_fsdp1_strategy_matches_one_process_with_resume_and_export(tmp_path):
    """Lightning's FSDPStrategy: configure_model makes `module.model` the FSDP1 root (the LightningModule stays
    unwrapped, so GRPO's manual backward runs outside any FSDP forward), the gradient is clipped by the global
    norm (the clip is active: norms 1.2-1.4 > 1.0 measured in the first steps); 3 steps in one process == 2 steps
    on 2 ranks, a sharded checkpoint and a resumed third."""
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "single", tmp_path / "fsdp1"
    _run("--devices", 1, "--steps", 3, "--out", single)
    _run("--devices", 2, "--steps", 2, "--resume-steps", 3, "--fsdp1", "--out", sharded)

    (reference,) = _losses(single, 1)
    info = [json.loads((sharded / f"losses_rank{r}.json").read_text()) for r in range(2)]
    assert all(i["model_class"] == "FullyShardedDataParallel" and not i["lightning_module_wrapped"] for i in info)
    # FSDP1 flattens parameters to 1-D shards: the weight-decay groups still follow the original shapes
    single_groups = json.loads((single / "losses_rank0.json").read_text())["param_groups"]
    assert len(single_groups) == 2 and all(i["param_groups"] == single_groups for i in info)
    per_rank = [i["losses"] for i in info]
    assert len(reference) == 3 and all(len(r) == 3 for r in per_rank)
    assert [(a + b) / 2 for a, b in zip(*per_rank)] == pytest.approx(reference, abs=2e-6)
    assert reference[-1] != 0.0
    assert (sharded / "ckpt" / "last.ckpt").is_dir()

    expected, got = torch.load(single / "params.pt"), torch.load(sharded / "params.pt")
    _assert_weights_close(got, expected)
    _assert_same_gradients(sharded, 2, single)
    exported = AutoModelForCausalLM.from_pretrained(sharded / "hf_model").state_dict()
    for key, value in got.items():
        assert torch.equal(exported[key], value), key


@pytest.mark.distributed
@pytest.mark.parametrize(("flags", "model_class"), [([], "PeftModelForCausalLM"), (["--fsdp1"], "FullyShardedDataParallel")],
                         ids=["fsdp2", "fsdp1"])
def test_grpo_lora_under_fsdp_matches_one_process_trains_adapters_only_and_exports_merged(tmp_path, flags, model_class):
    """LoRA: 2 steps on 2 ranks == 2 steps in one process (losses, KL, adapter weights); the base weights never
    move; the reference (adapters disabled) is exactly the starting model; the merged export reloads with plain
    transformers."""
    from transformers import AutoModelForCausalLM

    from aesl_lightning.infra.lora import LoRAConfig, merge_lora_state_dict

    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    _run("--devices", 1, "--steps", 2, "--lora", "--out", single)
    _run("--devices", 2, "--steps", 2, "--lora", *flags, "--out", sharded)

    (reference,) = _losses(single, 1)
    info = [json.loads((sharded / f"losses_rank{r}.json").read_text()) for r in range(2)]
    assert all(i["sharded"] and i["model_class"] == model_class for i in info)
    assert [(a + b) / 2 for a, b in zip(*(i["losses"] for i in info))] == pytest.approx(reference, abs=2e-6)
    single_kl = json.loads((single / "losses_rank0.json").read_text())["kl"]
    assert single_kl[0] == 0.0 and single_kl[1] > 1e-3  # B = 0 at the start: policy == reference
    assert [(a + b) / 2 for a, b in zip(*(i["kl"] for i in info))] == pytest.approx(single_kl, abs=1e-6)
    for i in info:
        assert i["reference"]["reference_vs_start"] == 0.0 and i["reference"]["policy_vs_start"] > 0.1

    expected, got = torch.load(single / "params.pt"), torch.load(sharded / "params.pt")
    _assert_weights_close(got, expected)  # measured: 8e-6 max, 2e-8 mean (lr 1e-2)
    _assert_same_gradients(sharded, 2, single)
    start = load_causal_lm("tiny-llama").state_dict()
    adapters = [k for k in got if ".lora_" in k]
    assert len(adapters) == 28 and max(got[k].abs().max().item() for k in adapters if ".lora_B." in k) > 1e-3
    for key, value in got.items():
        if ".lora_" not in key:  # frozen base weights: bit for bit the start
            assert torch.equal(value, start[key.replace("base_model.model.", "", 1).replace(".base_layer.", ".")]), key

    exported = AutoModelForCausalLM.from_pretrained(sharded / "hf_model").state_dict()
    merged = merge_lora_state_dict(expected, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    assert set(exported) == set(start)
    for key, value in exported.items():
        torch.testing.assert_close(value, merged[key], atol=1e-5, rtol=0, msg=key)
    assert max((exported[k] - start[k]).abs().max().item() for k in start) > 1e-3
