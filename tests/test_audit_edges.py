"""Edge cases of issue 23: items 2-6 of its maths audit, and the rollout sampler's precision mismatch.

Each fix has a test that fails on the code before it; `test_protection_keeps_...` pins the rule aesl_v1 breaks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aesl_lightning.maths import loss_registry
from aesl_lightning.maths.gates import TokenView, aesl_terms, aesl_v1_terms, prefix_mean
from aesl_lightning.maths.grpo_loss import group_advantages
from aesl_lightning.maths.losses import LOSSES, LossConfig
from aesl_lightning.modules.rollout import reward_metrics

# ------------------------------------------------------------------------------------ zero-variance groups


def _formatted_but_wrong_group():
    """reward_weights [1.0, 0.1], G = 8: a group where every completion is formatted (0.1) but wrong (0), and a group
    with varied rewards; the weighted total as the GRPO step computes it (float32 nansum)."""
    weights = torch.tensor([1.0, 0.1])
    constant = torch.tensor([[0.0, 1.0]] * 8)
    varied = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    rewards = torch.cat([constant, varied])
    return rewards, weights, (rewards * weights).nansum(dim=1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_gets_advantage_exactly_zero(scale):
    rewards, _, total = _formatted_but_wrong_group()
    assert total[:8].tolist() == [total[0].item()] * 8  # the same float32 0.1 eight times
    advantages = group_advantages(total, 8, scale)
    assert advantages.dtype == torch.float32
    assert advantages[:8].tolist() == [0.0] * 8  # before: -7.45e-05 each (float32 mean of 0.1 is not 0.1)
    # the other group is unchanged: the float64 equation
    grouped = total.double().view(2, 8)
    centred = grouped[1] - grouped[1].mean()
    std = {"group": grouped[1].std(), "batch": total.double().std(), "none": torch.tensor(1.0, dtype=torch.float64)}[scale]
    expected = centred / (std + (0.0 if scale == "none" else 1e-4))
    torch.testing.assert_close(advantages[8:].double(), expected, rtol=1e-6, atol=1e-7)


def test_frac_reward_zero_std_counts_groups_of_equal_rewards():
    rewards, weights, _ = _formatted_but_wrong_group()
    metrics = reward_metrics(rewards, weights, ["accuracy", "format"], 8)
    assert metrics["train/frac_reward_zero_std"].item() == 0.5  # before: 0.0 (float32 std of 8 x 0.1 is ~1e-8)
    # within a reward function's own float noise (0.1 + 0.2 against 0.3) still one value; a real difference is not
    noisy = torch.tensor([[0.1 + 0.2]] * 4 + [[0.3]] * 4 + [[0.3]] * 7 + [[0.31]])
    metrics = reward_metrics(noisy, torch.tensor([1.0]), ["r"], 8)
    assert metrics["train/frac_reward_zero_std"].item() == 0.5
    assert group_advantages(noisy.squeeze(1), 8)[:8].abs().max().item() == 0.0


# ------------------------------------------------------------------------------------ the protection rule

MATHS = Path(__file__).resolve().parents[1] / "docs" / "maths.md"  # the README's maths, moved there (issue 24)


@pytest.mark.parametrize("name", ["aesl", "aesl_anchor", "aesl_entropy_floor", "aesl_drift"])
@pytest.mark.parametrize("protect_below", [0.0, 0.3, 0.49])
def test_protect_below_under_one_half_is_refused_for_the_protected_losses(name, protect_below):
    with pytest.raises(ValueError, match=r"LossConfig\.protect_below: .*>= 0\.5"):
        LossConfig(name=name, protect_below=protect_below)


def test_protect_below_of_one_half_or_more_is_accepted_and_aesl_v1_is_labelled():
    for value in (0.5, 0.8):
        assert LossConfig(protect_below=value).protect_below == value
    LossConfig(name="aesl_v1", protect_below=0.0)  # reads no protect_below
    assert LOSSES["aesl"].protected and not LOSSES["aesl_v1"].protected
    # every place that lists aesl_v1 says it does not meet the rule: the CLI help, its function, the registry, the docs
    for text in (LossConfig.__doc__, aesl_v1_terms.__doc__, loss_registry.__doc__):
        assert "does NOT meet the protection rule" in " ".join(text.split())
    readme = MATHS.read_text()
    assert "| `aesl_v1` (first reading; reproduction only) | tok_t * seq1_t | none; does NOT meet the protection rule" in readme


def test_protection_keeps_an_unlearned_token_after_a_confident_prefix():
    """p = 0.002 after six tokens at 0.99: weight 1 under the default aesl, 0 under aesl_v1 (the rule it breaks)."""
    view = TokenView(logprob=torch.tensor([[0.99] * 6 + [0.002]]).log(), mask=torch.ones(1, 7, dtype=torch.bool))
    assert aesl_terms(view, LossConfig()).nll[0, -1].item() == 1.0
    assert aesl_v1_terms(view, LossConfig(name="aesl_v1")).nll[0, -1].item() == 0.0


def test_readme_example_weights_are_what_the_default_thresholds_give():
    """The maths page: p = [.99, .99, .01, .5] under aesl_v1 gives [0, 0, 0, 1] at tau_tok = tau_seq = 0.9, [1, 0, 0, 1] with
    tau_tok = 1, and the default aesl gives [0, 0, 1, 1]."""
    view = TokenView(logprob=torch.tensor([[0.99, 0.99, 0.01, 0.5]]).log(), mask=torch.ones(1, 4, dtype=torch.bool))
    assert aesl_v1_terms(view, LossConfig(name="aesl_v1")).nll.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert aesl_v1_terms(view, LossConfig(name="aesl_v1", tau_tok=1.0)).nll.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert aesl_terms(view, LossConfig()).nll.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    readme = " ".join(MATHS.read_text().split())
    assert ("p = [.99, .99, .01, .5] gives weights [0, 0, 0, 1] at the default tau_tok = tau_seq = 0.9, and [1, 0, 0, 1] "
            "with the token gate off, tau_tok = 1") in readme
    assert "the default `aesl` gives [0, 0, 1, 1]" in readme


# ------------------------------------------------------------------------------------ packed rows


@pytest.mark.parametrize("name", ["aesl", "aesl_v1"])
def test_a_second_completion_in_a_packed_row_gets_the_weights_it_gets_alone(name):
    """[.7, .6] after six tokens at 0.99: packed behind them in one row (a masked hole between the two samples) it must
    be weighted as alone ([1, 1]: nothing before it in its own completion); before the fix the window ran over the
    hole and gave [0, 0] under both (aesl's protection does not cover p >= 0.5)."""
    config = LossConfig(name=name, protect_below=0.5)
    terms = aesl_terms if name == "aesl" else aesl_v1_terms
    first, second = [0.99] * 6, [0.7, 0.6]
    packed = TokenView(logprob=torch.tensor([first + [1.0, 1.0] + second]).log(),
                       mask=torch.tensor([[True] * 6 + [False, False] + [True, True]]))
    alone = TokenView(logprob=torch.tensor([second]).log(), mask=torch.ones(1, 2, dtype=torch.bool))
    weights = terms(packed, config).nll
    assert weights[0, -2:].tolist() == terms(alone, config).nll[0].tolist() == [1.0, 1.0]
    assert weights[0, :6].tolist() == [0.0] * 6  # the first sample's own confident tokens are still gated
    assert terms(packed, config).gates["prefix_confidence"][0, -2].item() == 0.0  # an empty prefix


def test_the_window_restarts_after_each_hole_and_counts_within_the_span():
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0, 10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, True, True, True, True]])
    mean, count = prefix_mean(values, mask, window=2)
    assert count.tolist() == [[0, 1, 2, 0, 0, 1, 2, 2]]
    assert mean.tolist() == [[0.0, 1.0, 1.5, 0.0, 0.0, 10.0, 15.0, 25.0]]
    mean, count = prefix_mean(values, mask, window=0)
    assert count.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]] and mean[0, -1].item() == 20.0


# ------------------------------------------------------------------------------------ validation means


def test_validation_means_are_token_weighted(tmp_path):
    """Two validation batches of 60 and 2 completion tokens: val/loss, val/token_entropy and the gate means are the
    means over all 62 tokens (sum of each batch's sums / 62), not the mean of the two batch means."""
    import lightning as L

    from aesl_lightning.modules.sft import SFTModule, ValidationGeneration

    module = SFTModule("tiny-llama", loss=LossConfig(tau_tok=0.02, tau_seq=0.5), val_generation=ValidationGeneration(num_prompts=0),
                       gate_check_batches=0)
    gen = torch.Generator().manual_seed(0)
    vocab = module.model.config.vocab_size

    def batch(rows, length, prompt):
        input_ids = torch.randint(3, vocab, (rows, length), generator=gen)
        labels = input_ids.clone()
        labels[:, :prompt] = -100
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    batches = [batch(2, 33, 3), batch(2, 8, 7)]  # 2 rows x 30 completion tokens, 2 rows x 1
    with torch.no_grad():  # the long batch continues greedily: its tokens are likelier than the short one's random ones
        ids = batches[0]["input_ids"]
        for t in range(3, ids.shape[1]):
            ids[:, t] = module.model(input_ids=ids[:, :t]).logits[:, -1].argmax(-1)
        batches[0]["labels"][:, 3:] = ids[:, 3:]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert counts == [60, 2]

    module.eval()
    sums: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    with torch.no_grad():
        for b in batches:
            out = module.compute_loss(b)
            stats = out.gate_stats()
            tokens = int(stats.pop("completion_tokens"))
            for key, value in {"loss": out.loss, **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * tokens
                means.setdefault(key, []).append(float(value))
    expected = {key: total / sum(counts) for key, total in sums.items()}
    # the case separates the two readings: the mean of the two batches' means (both hold 2 sequences) is far off
    assert abs(sum(means["loss"]) / 2 - expected["loss"]) > 0.05

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    logged = trainer.validate(module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)[0]
    for key in ("loss", "token_entropy", "token_gate_mean", "seq_gate_mean", "loss_weight_mean", "token_accuracy"):
        assert logged[f"val/{key}"] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert logged["val/completion_tokens"] == 62


# ------------------------------------------------------------------------------------ sampler precision mismatch


def test_truncated_importance_sampling_against_the_sampler_has_the_known_answer():
    """pi_old = 0.5 on every token; the sampler gave 0.25 (ratio 2, capped at C = 1.5) or 1.0 (ratio 0.5). With
    logp = old_logp (rho = 1), the per-token loss is -A w: rows A = +1 (two tokens, w = [1.5, 0.5]) and A = -1 (one
    token, w = 1.5) give the grpo loss (-(1.5 + 0.5) / 2 + 1.5) / 2 = 0.25, gradient -A w / (|o_i| N)."""
    from aesl_lightning.maths.grpo_loss import grpo_loss, sampler_importance_weights, sampler_mismatch

    old = torch.full((2, 2), 0.5, dtype=torch.float64).log()
    sampler = torch.tensor([[0.25, 1.0], [0.25, 1.0]], dtype=torch.float64).log()
    mask = torch.tensor([[True, True], [True, False]])
    weights = sampler_importance_weights(old, sampler, mask, cap=1.5)
    assert weights.tolist() == [[1.5, 0.5], [1.5, 0.0]]
    assert sampler_mismatch(old, sampler, mask).item() == pytest.approx(math.log(2), abs=1e-12)

    logp = old.clone().requires_grad_()
    out = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, sampler_logp=sampler, sampler_is_cap=1.5)
    assert out.loss.item() == pytest.approx(0.25, abs=1e-12)
    assert out.sampler_logp_diff.item() == pytest.approx(math.log(2), abs=1e-12)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5 / 4, -0.5 / 4], [1.5 / 2, 0.0]], dtype=torch.float64))
    # off by default: the sampler's log-probs only measure, the loss is the plain one
    plain = grpo_loss(old, old, torch.tensor([1.0, -1.0]), mask, sampler_logp=sampler)
    assert plain.loss.item() == pytest.approx((-1.0 + 1.0) / 2, abs=1e-12) and plain.sampler_logp_diff is not None
    with pytest.raises(ValueError, match="cap must be > 0"):
        sampler_importance_weights(old, sampler, mask, cap=0.0)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_generate_records_the_samplers_log_probs_of_the_sampled_tokens(num_samples):
    """The recorded log softmax(z / T)[token] equal the teacher-forced pass of the same model in float32 (to float32
    rounding: the KV cache against a full forward), with and without the shared prefill; sampled in bf16 they do not."""
    from aesl_lightning.infra.generation import SamplingConfig, generate
    from aesl_lightning.infra.models import load_causal_lm, load_tokenizer
    from aesl_lightning.modules.rollout import completion_log_probs

    model, tokenizer = load_causal_lm("tiny-llama"), load_tokenizer("tiny-llama")
    tokenizer.padding_side = "left"
    prompts = tokenizer(["12 + 3 =", "7 * 6 is"], return_tensors="pt", padding=True)
    sampling = SamplingConfig(num_samples=num_samples, temperature=0.7, max_new_tokens=7)
    differences = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            gen = generate(model, tokenizer, prompts["input_ids"], prompts["attention_mask"], sampling, record_logprobs=True)
        assert gen.sampler_logp.shape == gen.completion_ids.shape and gen.sampler_logp.dtype == torch.float32
        assert (gen.sampler_logp[~gen.completion_mask] == 0).all()
        with torch.no_grad():
            trainer, _ = completion_log_probs(model, torch.cat([gen.prompt_ids, gen.completion_ids], 1),
                                              torch.cat([gen.prompt_mask, gen.completion_mask.long()], 1), gen.completion_ids,
                                              gen.completion_mask, temperature=0.7)
        differences.append((gen.sampler_logp - trainer)[gen.completion_mask].abs().max().item())
    assert differences[0] < 1e-5, differences
    assert differences[1] > 1e-4, differences  # a bf16 sampler is measurably another distribution


def test_grpo_logs_the_sampler_mismatch_and_the_capped_correction_changes_nothing_when_they_agree(tmp_path):
    """Full fine-tuning in float32: the sampler and the policy pass compute the same numbers (to rounding), so
    train/sampler_logp_diff is ~0 and min(pi_old / pi_sampler, 2) = 1: the loss equals the run without correction."""
    import lightning as L

    from aesl_lightning.data import PromptDataModule
    from aesl_lightning.data.synthetic import ArithmeticConfig
    from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule

    losses = {}
    for cap in (None, 2.0):
        L.seed_everything(0)
        config = GRPOConfig(num_generations=4, max_new_tokens=6, beta=0.0, log_completions_every_n_steps=0,
                            reward_funcs=["aesl_lightning.scoring.rewards.boxed_format"], log_sampler_mismatch=True, sampler_is_cap=cap)
        module = GRPOModule("tiny-llama", lr=1e-2, grpo=config, evaluation=GRPOEvaluation(num_samples=0))
        data = PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=2, seed=1, max_steps=1), val_size=0,
                                test_size=0, batch_size=2, max_prompt_length=400)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, max_steps=1)
        trainer.fit(module, data)
        metrics = trainer.callback_metrics
        assert 0.0 <= metrics["train/sampler_logp_diff"].item() < 1e-5
        losses[cap] = metrics["train/loss"].item()
    assert losses[2.0] == pytest.approx(losses[None], abs=1e-6)
    with pytest.raises(ValueError, match=r"grpo\.sampler_is_cap must be None or > 0"):
        GRPOConfig(sampler_is_cap=0.0)


def test_checkpoints_naming_the_config_classes_in_grpo_still_load(tmp_path):
    """Before grpo_config.py, checkpoints pickled aesl_lightning.grpo.GRPOConfig / GRPOEvaluation."""
    from aesl_lightning.modules import grpo
    from aesl_lightning.modules.grpo_config import GRPOConfig, GRPOEvaluation

    path = tmp_path / "old.ckpt"
    try:  # pickle them under their old names, as an old checkpoint has them
        GRPOConfig.__module__ = GRPOEvaluation.__module__ = "aesl_lightning.grpo"
        torch.save({"grpo": GRPOConfig(beta=0.1), "evaluation": GRPOEvaluation(num_samples=2)}, path)
    finally:
        GRPOConfig.__module__ = GRPOEvaluation.__module__ = "aesl_lightning.modules.grpo_config"
    assert b"grpo_config" not in path.read_bytes()
    loaded = torch.load(path, weights_only=True)
    assert loaded["grpo"] == GRPOConfig(beta=0.1) and loaded["evaluation"] == GRPOEvaluation(num_samples=2)
    assert grpo.GRPOConfig is GRPOConfig
