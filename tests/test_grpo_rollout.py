"""GRPO rollouts are faithful (no dropout, merged adapters, ratio exactly 1 at the first inner iteration), the
step logs its time per phase, and rewards that are not finite numbers never reach the optimiser."""

import logging

import lightning as L
import pytest
import torch

import aesl_lightning.modules.grpo as grpo_module
import aesl_lightning.modules.rollout as rollout_module
from aesl_lightning.data import PromptDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.generation import generate
from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule, load_reward_funcs
from aesl_lightning.infra.lora import LoRAConfig, merge_lora
from aesl_lightning.modules.rollout import PhaseTimer, check_finite, score_completions, warn_missing_groups


def high_chars(prompts, completions, **_):
    return [sum((ord(c) - 32) / 94 for c in text) / len(text) if text else 0.0 for text in completions]


def none_for_all(prompts, completions, **_):
    return [None] * len(completions)


HIGH_CHARS = f"{__name__}.high_chars"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _module(lora_dropout=0.5, **grpo):
    config = dict(num_generations=4, max_new_tokens=6, beta=0.04, reward_funcs=[HIGH_CHARS], log_completions_every_n_steps=0)
    module = GRPOModule("tiny-llama", lora=LoRAConfig(r=4, dropout=lora_dropout), lr=1e-2,
                        grpo=GRPOConfig(**{**config, **grpo}), evaluation=GRPOEvaluation(num_samples=0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters that matter (B = 0 would make LoRA, its dropout and merging invisible)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module


def _data(num_examples=4, batch_size=2):
    return PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=num_examples, seed=1, max_steps=1),
                            val_size=0, test_size=0, batch_size=batch_size, max_prompt_length=400)


def _batch(module, data):
    data.attach_tokenizer(module.tokenizer)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _trainer(tmp_path, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, log_every_n_steps=1,
                     limit_val_batches=0, **kwargs)


def _weights(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


# ------------------------------------------------------------------------------------------ faithful rollouts
def test_rollouts_with_lora_dropout_are_reproducible_and_equal_the_merged_models():
    module = _module(lora_dropout=0.5, disable_dropout=False)  # dropout live in training, never in rollouts
    module.model.train()
    batch = _batch(module, _data())
    before = _weights(module)
    torch.manual_seed(11)
    first = module.make_rollout(batch)
    torch.manual_seed(11)
    second = module.make_rollout(batch)
    assert torch.equal(first.generation.completion_ids, second.generation.completion_ids)
    assert torch.equal(first.ref_logp, second.ref_logp)

    keep = batch["attention_mask"].any(dim=0)
    merged = merge_lora(module.model).eval()
    torch.manual_seed(11)
    expected = generate(merged, module.tokenizer, batch["input_ids"][:, keep], batch["attention_mask"][:, keep],
                        module.grpo.sampling, record_entropy=True)
    assert torch.equal(first.generation.completion_ids, expected.completion_ids)
    # the module is back in train mode with the very same weights (merging restored them bit for bit)
    assert module.model.training and all(m.training for m in module.model.modules())
    assert all(torch.equal(before[n], p) for n, p in module.model.named_parameters())


def test_rollouts_are_sampled_from_merged_adapters_in_eval_mode():
    from peft.tuners.lora import LoraLayer

    seen = {}

    class Spy(GRPOModule):
        def sample(self, input_ids, attention_mask, sampling):
            layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            seen["merged"] = bool(layers) and all(layer.merged for layer in layers)
            seen["training"] = any(m.training for m in self.model.modules())
            return super().sample(input_ids, attention_mask, sampling)

    module = Spy("tiny-llama", lora=LoRAConfig(r=4, dropout=0.5), grpo=GRPOConfig(
        num_generations=2, max_new_tokens=4, beta=0.0, reward_funcs=[HIGH_CHARS], log_completions_every_n_steps=0))
    module.make_rollout(_batch(module, _data()))
    assert seen == {"merged": True, "training": False}
    assert not any(m.merged for m in module.model.modules() if isinstance(m, LoraLayer))


def test_old_and_reference_log_probs_are_eval_mode_passes():
    module = _module(lora_dropout=0.5, disable_dropout=False, num_iterations=2)
    module.model.train()
    rollout = module.make_rollout(_batch(module, _data()))
    gen = rollout.generation
    args = (rollout.input_ids, rollout.attention_mask, gen.completion_ids, gen.completion_mask)
    module.model.eval()
    with torch.no_grad():
        expected, _ = module.sequence_log_probs(module.model, *args, return_entropy=True)
    assert torch.equal(rollout.old_logp, expected)
    module.model.train()  # dropout 0.5 on the adapters: a train-mode pass is a different, random policy
    with torch.no_grad():
        noisy, _ = module.sequence_log_probs(module.model, *args)
    assert (noisy - expected)[gen.completion_mask].abs().max() > 1e-3


def test_disable_dropout_switches_off_every_dropout_by_default():
    module = _module(lora_dropout=0.5)
    assert GRPOConfig().disable_dropout is True
    dropouts = [m for m in module.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    kept = _module(lora_dropout=0.5, disable_dropout=False)
    assert {m.p for m in kept.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_ratio_is_exactly_one_at_the_first_inner_iteration(tmp_path, monkeypatch, disable_dropout):
    calls = []
    real = grpo_module.grpo_loss

    def recording(logp, old_logp, *args, **kwargs):
        out = real(logp, old_logp, *args, **kwargs)
        calls.append((logp.detach().clone(), old_logp.detach().clone(), out.ratio_mean.item()))
        return out

    monkeypatch.setattr(grpo_module, "grpo_loss", recording)
    L.seed_everything(0)
    module = _module(lora_dropout=0.5, num_iterations=2, disable_dropout=disable_dropout)
    _trainer(tmp_path, max_steps=2).fit(module, _data(num_examples=2, batch_size=2))
    assert len(calls) == 2  # one rollout batch, mu = 2 optimiser steps
    (logp0, old0, ratio0), (logp1, old1, ratio1) = calls
    assert torch.equal(old0, old1)  # both iterations use the generation-time log-probs
    if disable_dropout:  # the training forward is the policy that sampled: pi_theta / pi_old = 1, bit for bit
        assert torch.equal(logp0, old0) and ratio0 == 1.0
        assert not torch.equal(logp1, old1)  # after one optimiser step the policy has moved
    else:  # TRL's disable_dropout=False: LoRA dropout 0.5 in the training forward perturbs the ratio
        assert not torch.equal(logp0, old0)


def test_rollout_entropies_come_from_the_policy_pass_not_from_generate(tmp_path, monkeypatch):
    """Sampling runs no per-token entropy recorder; the rollouts' entropy (train/gen_entropy) is the first policy
    pass's, i.e. the entropy of softmax(z / T) at every sampled position, and equals train/entropy."""
    calls, seen = [], {}
    real_generate = grpo_module.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("record_entropy", False))
        return real_generate(*args, **kwargs)

    class Spy(GRPOModule):
        def make_rollout(self, batch, timer=None):
            rollout = super().make_rollout(batch, timer)
            with torch.no_grad():  # the weights the first policy pass sees
                seen["logits"] = self.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                            position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
            seen["rollout"] = rollout
            return rollout

    monkeypatch.setattr(grpo_module, "generate", spy)
    module = Spy("tiny-llama", grpo=GRPOConfig(num_generations=4, max_new_tokens=6, beta=0.0, temperature=0.7,
                                                       reward_funcs=[HIGH_CHARS], log_completions_every_n_steps=0),
                 evaluation=GRPOEvaluation(num_samples=0))
    _trainer(tmp_path, max_steps=1).fit(module, _data(num_examples=2, batch_size=2))
    assert calls == [False]
    rollout = seen["rollout"]
    gen = rollout.generation
    logits = seen["logits"]
    width = gen.completion_ids.shape[1]
    expected = torch.distributions.Categorical(logits=logits[:, -width - 1 : -1].double() / 0.7).entropy()
    expected = expected.float() * gen.completion_mask
    torch.testing.assert_close(gen.entropy, expected, rtol=1e-4, atol=1e-5)
    metrics = module.trainer.callback_metrics
    mean = expected.sum() / gen.completion_mask.sum()
    torch.testing.assert_close(metrics["train/gen_entropy"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["train/entropy"], mean, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- step breakdown
class _Clock:
    """A stand-in for `time.perf_counter` that advances by exactly 1 s per reading: a phase entered once (and
    holding no other phase) lasts 1 s, so n entries sum to n s and an overwrite would show 1 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_step_time_breakdown_is_logged(tmp_path):
    module = _module(num_iterations=2)
    _trainer(tmp_path, max_steps=2).fit(module, _data(num_examples=2, batch_size=2))
    metrics = module.trainer.callback_metrics
    phases = ["sampling", "scoring", "old_logprobs", "ref_logprobs", "policy", "optimizer"]
    times = {p: float(metrics[f"train/time/{p}"]) for p in phases}
    assert all(t > 0 for t in times.values()), times
    step = float(metrics["train/time/step"])
    assert sum(times.values()) <= step < sum(times.values()) + 1.0


def test_logged_phase_times_sum_the_phases_entered_several_times_in_a_step(tmp_path, monkeypatch):
    """mu = 2: `policy` and `optimizer` run twice per step and must log the sum of both (2 s on the clock that
    ticks 1 s per reading), the once-per-step phases 1 s; `step` holds the 8 inner entries (16 readings) + 1."""
    monkeypatch.setattr(rollout_module, "time", _Clock())
    module = _module(num_iterations=2)
    _trainer(tmp_path, max_steps=2).fit(module, _data(num_examples=2, batch_size=2))
    logged = {k.removeprefix("train/time/"): float(v) for k, v in module.trainer.callback_metrics.items()
              if k.startswith("train/time/")}
    assert logged == {"sampling": 1.0, "scoring": 1.0, "old_logprobs": 1.0, "ref_logprobs": 1.0, "policy": 2.0,
                      "optimizer": 2.0, "step": 17.0}


def test_phase_timer_sums_repeats(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(rollout_module, "time", clock)
    timer = PhaseTimer()
    for _ in range(3):
        with timer("a"):
            clock.now += 0.5  # the phase's own work: 0.5 s on top of the reading's 1 s
    with pytest.raises(RuntimeError), timer("b"):
        raise RuntimeError("counted anyway")
    with timer("b"):
        pass
    assert timer.seconds == {"a": 4.5, "b": 2.0}


# -------------------------------------------------------------------------------------------------- rewards
def _score(func, n=3, name="my_reward"):
    return score_completions([func], [name], ["p"] * n, ["a"] * n, [[1]] * n, {})


def test_none_and_nan_rewards_are_not_applicable():
    scores = _score(lambda **_: [1.0, None, float("nan")])
    assert scores[0, 0] == 1.0 and scores[1:, 0].isnan().all()
    assert _score(lambda **_: torch.tensor([0.5, 1.0, 0.0]))[:, 0].tolist() == [0.5, 1.0, 0.0]


@pytest.mark.parametrize("returned, message", [
    ([1.0, 2.0], "returned 2 rewards for 3 completions"),
    (1.0, "must return a list of 3 rewards"),
    ("1.0", "must return a list of 3 rewards"),
    ([1.0, "yes", 0.0], "returned str 'yes' for completion 1"),
    ([1.0, True, 0.0], "returned bool True for completion 1"),
    ([1.0, float("inf"), 0.0], "returned inf for completion 1"),
    ([float("-inf"), 1.0, 0.0], "returned -inf for completion 0"),
])
def test_bad_rewards_raise_naming_the_function(returned, message):
    with pytest.raises(ValueError, match="my_reward") as err:
        _score(lambda **_: returned)
    assert message in str(err.value)


def test_non_callable_reward_functions_are_refused():
    with pytest.raises(ValueError, match=r"grpo.reward_funcs\[1\].*BUILTIN_REWARDS.*not a function"):
        load_reward_funcs([HIGH_CHARS, "aesl_lightning.modules.grpo.BUILTIN_REWARDS"])
    with pytest.raises(ValueError, match="'oops' is not callable"):
        score_completions([3], ["oops"], ["p"], ["a"], [[1]], {})
    with pytest.raises(ValueError, match="reward_weights must be finite"):
        GRPOConfig(reward_funcs=[HIGH_CHARS], reward_weights=[float("nan")])


def test_groups_without_any_reward_are_warned_about(caplog):
    rewards = torch.tensor([[float("nan"), float("nan")]] * 2 + [[1.0, float("nan")], [float("nan"), float("nan")]])
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        assert warn_missing_groups(rewards, group_size=2) == 1
    assert "1 of 2 prompts got no reward at all" in caplog.text
    module = _module(reward_funcs=[f"{__name__}.none_for_all"], beta=0.0)
    with caplog.at_level(logging.WARNING, logger="aesl_lightning"):
        rollout = module.make_rollout(_batch(module, _data()))
    assert "2 of 2 prompts got no reward" in caplog.text
    assert torch.equal(rollout.advantages, torch.zeros(8))


def test_non_finite_loss_stops_before_the_optimiser(tmp_path, monkeypatch):
    real = grpo_module.grpo_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(grpo_module, "grpo_loss", poisoned)
    module = _module(beta=0.0)
    before = _weights(module)
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        _trainer(tmp_path, max_steps=1).fit(module, _data(num_examples=2, batch_size=2))
    assert all(torch.equal(before[n], p) for n, p in module.model.named_parameters())
    with pytest.raises(FloatingPointError, match="advantages is not finite .1 of 2"):
        check_finite("advantages", torch.tensor([0.0, float("inf")]))


def test_completion_log_probs_match_a_full_log_softmax():
    from aesl_lightning.modules.rollout import completion_log_probs

    module = _module(lora_dropout=0.0, beta=0.0)
    torch.manual_seed(0)
    rollout = module.make_rollout(_batch(module, _data()))
    gen = rollout.generation
    module.model.eval()
    mask = gen.completion_mask.clone()
    mask[::2, -2:] = False  # as if those rows had stopped early
    logp, entropy = completion_log_probs(module.model, rollout.input_ids, rollout.attention_mask, gen.completion_ids,
                                         mask, temperature=0.7, return_entropy=True)
    # slow reference: every position through the LM head, a float64 log-softmax, the completion slice
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = module.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                            position_ids=position_ids).logits.double() / 0.7
    length = gen.completion_ids.shape[1]
    logsm = torch.log_softmax(full[:, -length - 1 : -1], dim=-1)
    expected = logsm.gather(-1, gen.completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    expected_entropy = -(logsm.exp() * logsm).sum(-1) * mask
    torch.testing.assert_close(logp.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=2e-5, rtol=0)
    assert logp.dtype == torch.float32 and bool((logp[~mask] == 0).all())


def test_padding_buckets_split_where_the_padded_area_is_least():
    from aesl_lightning.modules.rollout import padding_buckets

    def masks(prompts, completions, width_p=6, width_c=9):
        p = torch.tensor([[0] * (width_p - n) + [1] * n for n in prompts])
        c = torch.tensor([[True] * n + [False] * (width_c - n) for n in completions])
        return p, c

    # four short completions and four long ones: the split separates them (area 8 x 15 -> 4 x 8 + 4 x 15)
    groups = padding_buckets(*masks([6] * 8, [2, 9, 2, 9, 1, 8, 2, 9]))
    assert [sorted(g.tolist()) for g in groups] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # every row appears exactly once; no worthwhile split -> one group in the original order
    assert padding_buckets(*masks([6] * 4, [9, 9, 8, 9]))[0].tolist() == [0, 1, 2, 3]
    assert len(padding_buckets(*masks([6] * 8, [2, 9, 2, 9, 1, 8, 2, 9]), max_buckets=1)) == 1
    # prompt lengths count too: short prompts with short completions go together
    groups = padding_buckets(*masks([1, 6, 1, 6], [1, 9, 1, 9]))
    assert [sorted(g.tolist()) for g in groups] == [[0, 2], [1, 3]]


def test_bucketed_log_probs_equal_one_batch_values_and_gradients():
    from aesl_lightning.modules.rollout import completion_log_probs

    module = _module(lora_dropout=0.0, beta=0.0, num_generations=4, max_new_tokens=12)
    torch.manual_seed(0)
    rollout = module.make_rollout(_batch(module, _data(num_examples=4, batch_size=4)))
    gen = rollout.generation
    mask = gen.completion_mask.clone()
    mask[::3, 2:] = False  # short completions beside long ones, so the rows do split
    from aesl_lightning.modules.rollout import padding_buckets
    assert len(padding_buckets(rollout.attention_mask[:, : -mask.shape[1]], mask, 2)) == 2
    module.model.double()  # float64, so that only a wrong row, column or position could differ
    args = (module.model, rollout.input_ids, rollout.attention_mask, gen.completion_ids, mask, 0.8, True)
    results = {}
    for buckets in (1, 2):
        module.model.zero_grad()
        logp, entropy = completion_log_probs(*args, max_buckets=buckets)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        results[buckets] = logp.detach(), entropy, grads
    torch.testing.assert_close(results[2][0], results[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[2][1] * mask, results[1][1] * mask, atol=1e-6, rtol=0)
    assert bool((results[2][0][~mask] == 0).all())
    assert results[1][2].keys() == results[2][2].keys() and results[1][2]
    for name, grad in results[1][2].items():
        torch.testing.assert_close(results[2][2][name], grad, atol=1e-6, rtol=1e-5)
