"""What one GRPO batch of rollouts is made of: faithful sampling, lean log-prob passes, checked rewards, timings.

- Faithful: the rollouts, their old log-probs and the reference log-probs come from the policy itself, with
  no dropout (`eval_mode`), so the ratio pi_theta / pi_old is exactly 1 before the first optimiser step.
- Fast: LoRA adapters are merged for sampling (`aesl_lightning.infra.lora.merged_adapters`, unsharded models; under
  FSDP the gathered weights are used as they are, see `aesl_lightning.infra.fsdp.unsharded_for_generation`).
- Lean: log-probs are taken at the completion positions only (`logits_to_keep`), through the fused log-prob
  kernel, which keeps no float32 [N, L, V] copy of the logits.
- Safe: reward functions follow TRL's contract (None or NaN: not applicable), anything else that is not a
  finite number is an error that names the function.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from aesl_lightning.infra.generation import Generation
from aesl_lightning.maths.grpo_loss import constant_groups
from aesl_lightning.ops.kernels import token_logprobs

log = logging.getLogger("aesl_lightning")


@dataclass
class Rollout:
    """One batch of rollouts: everything the mu optimisation steps need, no gradient attached."""

    generation: Generation
    input_ids: torch.Tensor  # [N, P + L] prompt then completion
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor  # [N, L] bool
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N, num reward funcs], NaN where a function gave None
    old_logp: torch.Tensor | None  # [N, L]; None with mu == 1 (old = current, detached)
    ref_logp: torch.Tensor | None  # [N, L]; None with beta == 0


# --------------------------------------------------------------------------------------------------- dropout
def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch off every dropout of `model` in place (TRL's `disable_dropout`): each `nn.Dropout` gets p = 0
    (LoRA's adapter dropout included) and each attention module's float `attention_dropout` becomes 0.
    With p = 0 `torch.dropout` returns its input unchanged, so train-mode forwards cost nothing extra."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


@contextmanager
def sampling_weights(model: nn.Module) -> Iterator[nn.Module]:
    """`model`'s weights as `generate` should see them: FSDP units gathered once for the whole rollout, else
    LoRA adapters merged into their layers (one matmul per linear; the original tensors restored on exit)."""
    from aesl_lightning.infra.fsdp import is_sharded, unsharded_for_generation, unwrap
    from aesl_lightning.infra.lora import merged_adapters

    if is_sharded(model):
        with unsharded_for_generation(model):
            yield model
    else:
        with merged_adapters(unwrap(model)):
            yield model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode within the block (no dropout), back to its previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ log-probs
def padding_buckets(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, max_buckets: int = 2,
                    min_saving: float = 0.1) -> list[torch.Tensor]:
    """Row groups for the log-prob passes that waste less compute on padding than one [N, P + L] batch.

    A group runs over columns [P - its longest prompt, P + its longest completion), so its padded area is
    rows x (longest prompt + longest completion). With `max_buckets` 2 the rows are ordered (by completion
    length, or by total length, whichever splits better) and cut where the two groups' areas add up to the
    least; the split is kept only if it saves at least `min_saving` of the one-batch area. Deterministic in
    the masks, so the old-policy and policy passes of a rollout split alike (ratio 1 bit for bit)."""
    n = prompt_mask.shape[0]
    prompt_len, completion_len = prompt_mask.sum(1).tolist(), completion_mask.sum(1).tolist()
    whole = n * (max(prompt_len, default=0) + max(completion_len, default=0))
    if max_buckets < 2 or n < 2 or whole == 0:
        return [torch.arange(n, device=prompt_mask.device)]
    best, best_order, best_cut = whole, None, n
    for key in (lambda i: (completion_len[i], prompt_len[i]), lambda i: (prompt_len[i] + completion_len[i], completion_len[i])):
        order = sorted(range(n), key=key)
        head_p = head_c = 0
        heads = []
        for i in order:  # longest prompt and completion among the first r rows, r = 1..n
            head_p, head_c = max(head_p, prompt_len[i]), max(head_c, completion_len[i])
            heads.append((head_p, head_c))
        tail_p = tail_c = 0
        for cut in range(n - 1, 0, -1):  # rows [cut, n) form the second group
            i = order[cut]
            tail_p, tail_c = max(tail_p, prompt_len[i]), max(tail_c, completion_len[i])
            area = cut * sum(heads[cut - 1]) + (n - cut) * (tail_p + tail_c)
            if area < best:
                best, best_order, best_cut = area, order, cut
    if best_order is None or best > (1 - min_saving) * whole:
        return [torch.arange(n, device=prompt_mask.device)]
    order = torch.tensor(best_order, device=prompt_mask.device)
    return [order[:best_cut], order[best_cut:]]


def completion_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    max_buckets: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [N, L], entropy [N, L] or None), both float32, for the last L = completion_ids.shape[1] tokens:

        logp_{i,t} = log softmax(z_{i,t} / T)[o_{i,t}],   entropy_{i,t} = -sum_v p_v log p_v,  p = softmax(z_{i,t} / T)

    with z the logits that predict completion token t and T the sampling temperature (the distribution the
    tokens were drawn from). Only the L + 1 last positions go through the LM head (`logits_to_keep`);
    positions outside `completion_mask` get 0 (and no gradient). Position ids follow the attention mask, as
    `generate` numbers left-padded prompts. Differentiable in logp when grad is enabled; entropy is detached.

    `max_buckets` 2 runs the rows in up to two groups, each cut to its own prompt and completion extent
    (`padding_buckets`): the same numbers, less padding computed (one autograd graph either way, so a single
    backward; keep 1 for models sharded with FSDP, whose units expect one forward per backward).
    """
    length = completion_ids.shape[1]
    mask = completion_mask.bool() if completion_mask is not None else None
    temperature = temperature if temperature > 0 else 1.0
    prompt_width = input_ids.shape[1] - length
    groups: list = [None]  # None: the whole batch as it is
    if max_buckets > 1 and mask is not None:
        split = padding_buckets(attention_mask[:, :prompt_width], mask, max_buckets)
        groups = split if len(split) > 1 else groups
    pieces = []
    for rows in groups:
        ids, att, comp, m = ((input_ids, attention_mask, completion_ids, mask) if rows is None else
                             (input_ids[rows], attention_mask[rows], completion_ids[rows], mask[rows]))
        width = length
        if rows is not None:  # cut the group's all-padding columns: prompts are left-, completions right-padded
            first = prompt_width - int(att[:, :prompt_width].sum(1).max())
            width = int(m.sum(1).max())
            ids, att = ids[:, first:prompt_width + width], att[:, first:prompt_width + width]
            comp, m = comp[:, :width], m[:, :width]
        position_ids = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids,
                       use_cache=False, logits_to_keep=width + 1).logits[:, :-1]
        pieces.append(token_logprobs(logits, comp, temperature=temperature, mask=m, return_entropy=return_entropy))
    if groups[0] is None:
        return pieces[0]
    inverse = torch.argsort(torch.cat(groups))
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))  # noqa: E731  zeros beyond a group's width
    logp = torch.cat([pad(lp) for lp, _ in pieces])[inverse]
    entropy = torch.cat([pad(h) for _, h in pieces])[inverse] if return_entropy else None
    return logp, entropy


# --------------------------------------------------------------------------------------------------- rewards
def load_reward_funcs(paths: list[str], builtins: Sequence[str] = ()) -> list:
    """Import each `package.module.function` (or `package.module:function`) of `grpo.reward_funcs`.

    While a module is rebuilt from a checkpoint (`aesl_lightning.infra.checkpoint_io.checkpoint_names`), a name that is
    neither in `builtins` (the toolkit's rewards) nor allowed by the caller is not imported (importing runs the
    module's code): it becomes a `NotImportedReward` that raises, naming the checkpoint, if it is ever called.
    """
    from aesl_lightning.infra.checkpoint_io import untrusted_name

    funcs = []
    for i, path in enumerate(paths):
        module_name, _, name = str(path).replace(":", ".").rpartition(".")
        source = untrusted_name(f"{module_name}.{name}", builtins)
        if source is not None:
            log.warning("grpo.reward_funcs[%d]: %r comes from %s and was not imported (a checkpoint's names are not "
                        "trusted); name it in your config or command line to use it", i, path, source)
            funcs.append(NotImportedReward(str(path), source))
            continue
        try:
            func = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"grpo.reward_funcs[{i}]: cannot import {path!r} (expected package.module.function): {err}") from err
        if not callable(func):
            raise ValueError(f"grpo.reward_funcs[{i}]: {path!r} is a {type(func).__name__}, not a function")
        funcs.append(func)
    return funcs


class NotImportedReward:
    """A reward function a checkpoint names but nobody allowed: it keeps the name and refuses to be called."""

    def __init__(self, path: str, source: str) -> None:
        self.path, self.source = path, source
        self.__name__ = path.replace(":", ".").rpartition(".")[2]

    def __call__(self, *args, **kwargs):
        raise PermissionError(
            f"reward function {self.path!r} was named by {self.source} and not imported (a checkpoint's names are "
            "not trusted); pass it in grpo.reward_funcs of your config or command line to allow it"
        )


def score_completions(funcs: Sequence, names: Sequence[str], prompts: list, completions: list[str],
                      completion_ids: list[list[int]], columns: dict) -> torch.Tensor:
    """Rewards [N, num funcs] (float32) of N completions; TRL's contract for each `f(prompts, completions, **kw)`:

    a list (or tuple / 1-D array) of N values, each a real number, None or NaN ("not applicable": NaN here, left
    out of the weighted sum). Anything else raises `ValueError` naming the function: a non-callable, a scalar
    or a wrong length instead of N values, a string, bool or other non-number, +-inf.
    """
    n = len(completions)
    scores = []
    for name, func in zip(names, funcs):
        if not callable(func):
            raise ValueError(f"reward function {name!r} is not callable (got {type(func).__name__})")
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if isinstance(values, torch.Tensor):
            values = values.tolist() if values.ndim == 1 else values
        elif hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:
            values = values.tolist()  # numpy arrays
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            raise ValueError(f"reward function {name} must return a list of {n} rewards (float or None), "
                             f"got {type(values).__name__}: {values!r:.80}")
        if len(values) != n:
            raise ValueError(f"reward function {name} returned {len(values)} rewards for {n} completions")
        row = []
        for i, value in enumerate(values):
            if value is None:
                row.append(math.nan)
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"reward function {name} returned {type(value).__name__} {value!r:.80} for "
                                 f"completion {i}; expected a float or None")
            if math.isinf(value):
                raise ValueError(f"reward function {name} returned {value} for completion {i}; rewards must be "
                                 "finite (None or NaN marks a completion the function does not apply to)")
            row.append(float(value))
        scores.append(row)
    return torch.tensor(scores, dtype=torch.float32).T.reshape(n, len(funcs))


def reward_metrics(rewards: torch.Tensor, weights: torch.Tensor, names: Sequence[str], group_size: int) -> dict:
    """TRL's reward logs: the weighted total's mean and std, the fraction of groups with zero std (all rewards
    equal, `constant_groups`: the groups whose advantages are 0), and each function's mean and std over the
    completions it applies to (`train/` prefixed)."""
    weighted = (rewards * weights).nansum(dim=1)
    values = {"train/reward/mean": weighted.mean(), "train/reward/std": weighted.std(),
              "train/frac_reward_zero_std": constant_groups(weighted, group_size).float().mean()}
    for j, name in enumerate(names):
        column = rewards[:, j][~rewards[:, j].isnan()]
        if column.numel():
            values[f"train/rewards/{name}/mean"] = column.mean()
            values[f"train/rewards/{name}/std"] = column.std() if column.numel() > 1 else column.new_zeros(())
    return values


def global_std(values: torch.Tensor) -> torch.Tensor | None:
    """The Bessel-corrected std of `values` gathered over all ranks (ranks may hold different counts), from
    float64 sums of count, x and x^2; None outside a multi-process run (use the local std)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    stats = torch.stack([torch.tensor(float(values.numel())), values.detach().double().sum().cpu(),
                         (values.detach().double() ** 2).sum().cpu()]).to(values.device)
    dist.all_reduce(stats)
    count, summed, squares = stats.tolist()
    variance = (squares - summed * summed / count) / max(count - 1.0, 1.0)
    return values.new_tensor(math.sqrt(max(variance, 0.0)))


def mean_tokens_per_rank(mask: torch.Tensor) -> torch.Tensor:
    """The token count of the whole global batch divided by the world size (dapo's normaliser: gradients are
    averaged over ranks, so each rank divides its sum by this to get the global token mean)."""
    count = mask.sum().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count


def warn_missing_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Warn when every reward function gave None for every completion of a prompt (the group gets zero
    advantages: nothing to learn from it); returns how many such groups there are."""
    missing = rewards.isnan().all(dim=1).view(-1, group_size).all(dim=1)
    count = int(missing.sum())
    if count:
        log.warning("%d of %d prompts got no reward at all (every reward function returned None for all %d "
                    "completions): their advantages are 0", count, missing.numel(), group_size)
    return count


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise `FloatingPointError` naming `name` if `value` holds NaN or +-inf (before it reaches the optimiser)."""
    if not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).sum().item()
        raise FloatingPointError(f"GRPO: {name} is not finite ({bad} of {value.numel()} values are NaN or inf); "
                                 "the optimiser step is skipped rather than poisoning the weights")


# ---------------------------------------------------------------------------------------------------- timing
class PhaseTimer:
    """Wall seconds per named phase of a step, summed over repeats (`with timer("sampling"): ...`).

    On a GPU the device is synchronised at both ends of a phase, so asynchronous kernels are charged to the
    phase that launched them."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._sync = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
