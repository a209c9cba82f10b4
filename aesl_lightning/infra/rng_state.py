"""Random states in checkpoints: a run resumed from a checkpoint draws what the interrupted run would have drawn.

GRPO samples its rollouts (and validation samples) from the global generators: torch's CPU generator, the CUDA
generator of the rank's device, and Python's `random` / NumPy's for reward functions that use them. Lightning
saves none of them, so a resumed run sampled from the seed of its start, not from where the run stood. The
mixin `ResumableRandomState` saves every rank's states with each checkpoint and puts them back when training
starts from one. Only types that `torch.load(weights_only=True)` reads are stored.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("aesl_lightning")

CHECKPOINT_KEY = "random_states"  # under checkpoint["aesl_lightning"]: one entry per rank


def capture_random_state(device: torch.device | None = None) -> dict:
    """This process's generator states: torch CPU, CUDA of `device` (if it is a CUDA device), Python, NumPy."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(state: dict, device: torch.device | None = None) -> None:
    """Set the generators to `state` (from `capture_random_state`); a CUDA state only onto a CUDA `device`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_ranks(state: dict) -> list[dict]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)  # every rank saves the checkpoint's state dict (Trainer.save_checkpoint)
    return gathered


class ResumableRandomState:
    """LightningModule mixin: each checkpoint holds every rank's random states (`checkpoint["aesl_lightning"]
    ["random_states"]`, a list by rank); a run resumed from it restores its own rank's in `on_train_start`.

    Restored there, not on load: the strategy's setup, the `on_fit_start` hooks and (where Lightning runs it on
    a resume) the sanity check come between loading and training, and a draw any of them makes is one the
    interrupted run did not make at this point. A checkpoint from another number of ranks, or one without the
    states, restores nothing (warned). The training loader must not draw from the global generators either
    (`PromptDataModule` gives it its own): a resumed run builds an iterator mid-epoch that the other did not.
    """

    _pending_random_states: list | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        states = _all_ranks(capture_random_state(self.device))
        checkpoint.setdefault("aesl_lightning", {})[CHECKPOINT_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # [] marks a checkpoint without states (warned only if training resumes from it, not for `test`)
        self._pending_random_states = checkpoint.get("aesl_lightning", {}).get(CHECKPOINT_KEY) or []

    def on_train_start(self) -> None:
        super().on_train_start()
        states, self._pending_random_states = self._pending_random_states, None
        if states is None:
            return
        if not states:
            log.warning("the checkpoint holds no random states: the resumed run samples from its own seed, not from "
                        "where the interrupted run stood")
        elif len(states) != self.trainer.world_size:
            log.warning("the checkpoint holds random states of %d ranks, this run has %d: they are not restored",
                        len(states), self.trainer.world_size)
        else:
            restore_random_state(states[self.global_rank], self.device)
