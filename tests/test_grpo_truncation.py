"""`grpo.mask_truncated_completions` (DAPO's overlong filtering): completions that hit max_new_tokens add nothing
to the loss or its gradient, and every other completion's contribution is exactly what it would be without the
option, checked against a float64 reference of the objective on the completions that ended."""

import lightning as L
import pytest
import torch

import aesl_lightning.modules.grpo as grpo_module
from aesl_lightning.data import PromptDataModule
from aesl_lightning.data.synthetic import ArithmeticConfig
from aesl_lightning.infra.generation import completion_mask_from_ids, eos_ids
from aesl_lightning.modules.grpo import GRPOConfig, GRPOEvaluation, GRPOModule

MAX_NEW_TOKENS, BETA, EPSILON = 6, 0.04, 0.2
ENDED_ROWS = {0: 2, 3: 4, 5: 0}  # row: position of the EOS written into it (any other row hits max_new_tokens)
REAL_LOSS = grpo_module.grpo_loss


def high_chars(prompts, completions, **_):
    return [sum((ord(c) - 32) / 94 for c in text) / len(text) if text else 0.0 for text in completions]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class EndedRows(GRPOModule):
    """Sampling as usual, then an EOS written at a fixed position of the rows of ENDED_ROWS: a random tiny model
    almost never stops by itself, and the test needs ended and truncated completions side by side."""

    def sample(self, input_ids, attention_mask, sampling):
        gen = super().sample(input_ids, attention_mask, sampling)
        eos = eos_ids(self.model, self.tokenizer)
        ids = gen.completion_ids.clone()
        assert ids.shape[1] == MAX_NEW_TOKENS
        ids[~gen.completion_mask | torch.isin(ids, torch.tensor(eos))] = 5  # an ordinary token: no row ends by itself
        for row, position in ENDED_ROWS.items():
            ids[row, position] = eos[0]
        gen.completion_mask, gen.truncated = completion_mask_from_ids(ids, eos)
        gen.completion_ids = ids.masked_fill(~gen.completion_mask, self.tokenizer.pad_token_id)
        gen.texts = self.tokenizer.batch_decode([row[m].tolist() for row, m in zip(gen.completion_ids, gen.completion_mask)],
                                                skip_special_tokens=True)
        return gen


def _run(tmp_path, monkeypatch, loss_type: str, mask_truncated: bool) -> dict:
    """One GRPO step (mu = 1, beta > 0); returns what reached `grpo_loss` and d loss / d logp."""
    seen = {}

    def recording(logp, old_logp, advantages, mask, ref_logp, **kwargs):
        out = REAL_LOSS(logp, old_logp, advantages, mask, ref_logp, **kwargs)
        (grad,) = torch.autograd.grad(out.loss, logp, retain_graph=True)
        seen.update(logp=logp.detach().clone(), advantages=advantages.clone(), mask=mask.clone(),
                    ref_logp=ref_logp.clone(), loss=out.loss.detach().clone(), grad=grad)
        return out

    class Capture(EndedRows):
        def make_rollout(self, batch, timer=None):
            rollout = super().make_rollout(batch, timer)
            seen["rollout"] = rollout
            return rollout

    monkeypatch.setattr(grpo_module, "grpo_loss", recording)
    L.seed_everything(0)
    module = Capture("tiny-llama", lr=1e-2, evaluation=GRPOEvaluation(num_samples=0), grpo=GRPOConfig(
        num_generations=4, max_new_tokens=MAX_NEW_TOKENS, beta=BETA, epsilon=EPSILON, loss_type=loss_type,
        mask_truncated_completions=mask_truncated, reward_funcs=[f"{__name__}.high_chars"], log_completions_every_n_steps=0))
    data = PromptDataModule(train="synthetic", synthetic=ArithmeticConfig(num_examples=2, seed=1, max_steps=1),
                            val_size=0, test_size=0, batch_size=2, max_prompt_length=400)
    L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=tmp_path).fit(module, data)
    return seen


def _reference_loss(logp, advantages, ref_logp, completion_mask, kept, loss_type) -> torch.Tensor:
    """The objective in float64 over the rows in `kept` only (mu = 1: old log-probs = logp, detached)."""
    ratio = torch.exp(logp - logp.detach())
    adv = advantages.double().unsqueeze(1)
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - EPSILON, 1 + EPSILON) * adv)
    delta = ref_logp - logp
    per_token = (surrogate + BETA * (torch.exp(delta) - delta - 1)) * completion_mask * kept.unsqueeze(1)
    n = logp.shape[0]
    if loss_type == "grpo":
        return (per_token.sum(1) / completion_mask.sum(1)).sum() / n
    if loss_type == "dapo":
        return per_token.sum() / (completion_mask * kept.unsqueeze(1)).sum()
    return per_token.sum() / (n * MAX_NEW_TOKENS)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_truncated_completions_contribute_nothing_and_the_others_are_unchanged(tmp_path, monkeypatch, loss_type):
    masked = _run(tmp_path / "masked", monkeypatch, loss_type, mask_truncated=True)
    plain = _run(tmp_path / "plain", monkeypatch, loss_type, mask_truncated=False)
    gen = masked["rollout"].generation
    truncated, completion_mask = gen.truncated, gen.completion_mask
    assert truncated.tolist() == [i not in ENDED_ROWS for i in range(8)]
    assert torch.equal(gen.completion_ids, plain["rollout"].generation.completion_ids)  # same rollouts both ways
    assert bool((masked["advantages"] != 0).all())  # every row would move the policy if it were let in

    # the loss mask: nothing of a truncated row, the completion mask of every other row
    assert not masked["mask"][truncated].any()
    assert torch.equal(masked["mask"][~truncated], completion_mask[~truncated])
    assert torch.equal(plain["mask"], completion_mask)

    # the loss and d loss / d logp equal a float64 reference over the ended rows alone
    logp = masked["logp"].double().requires_grad_()
    expected = _reference_loss(logp, masked["advantages"], masked["ref_logp"].double(), completion_mask.double(),
                               (~truncated).double(), loss_type)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(masked["loss"].double(), expected.detach(), rtol=1e-5, atol=1e-7)
    assert not masked["grad"][truncated].any()
    torch.testing.assert_close(masked["grad"].double(), expected_grad, rtol=1e-5, atol=1e-9)

    # without the option the truncated rows do pull (the check has teeth) and, apart from dapo's token count,
    # the ended rows' gradient is the very same as with it
    assert plain["grad"][truncated].abs().sum() > 0
    kept = ~truncated
    if loss_type == "dapo":  # the token mean now runs over the ended rows' tokens only
        scale = completion_mask.sum() / completion_mask[kept].sum()
        torch.testing.assert_close(masked["grad"][kept], plain["grad"][kept] * scale, rtol=1e-5, atol=1e-9)
    else:
        torch.testing.assert_close(masked["grad"][kept], plain["grad"][kept], rtol=0, atol=0)
