"""The cost of generation at validation as a fraction of an SFT epoch, read from a finished run's logs.

    python -m aesl_lightning fit --config experiments/quickstart.yaml
    python benchmarks/validation_cost.py lightning_logs/quickstart/version_0 --steps-per-epoch 16

Training step time is the median gap between consecutive `train/loss` events that have no validation in
between; generation time is `val/generation_seconds` as logged by SFTModule (greedy + sampled completions on
the held-out prompts). Both come from the same run, so they saw the same machine.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder with TensorBoard event files")
    parser.add_argument("--steps-per-epoch", type=int, required=True, help="training batches per epoch")
    args = parser.parse_args()

    events = EventAccumulator(str(args.run_dir), size_guidance={"scalars": 0}).Reload()
    tags = events.Tags()["scalars"]
    if "val/generation_seconds" not in tags:
        raise SystemExit(f"{args.run_dir}: no val/generation_seconds scalar (generation at validation was off?)")
    train = events.Scalars("train/loss")
    val_steps = {e.step for e in events.Scalars("val/loss")} if "val/loss" in tags else set()
    gaps = [b.wall_time - a.wall_time for a, b in zip(train, train[1:]) if not any(a.step <= s < b.step for s in val_steps)]
    step_seconds = statistics.median(gaps)
    generation = [e.value for e in events.Scalars("val/generation_seconds")]
    epoch_seconds = step_seconds * args.steps_per_epoch
    print(f"run: {args.run_dir}")
    print(f"median training step: {step_seconds:.2f} s over {len(gaps)} steps -> epoch of {args.steps_per_epoch} steps: {epoch_seconds:.0f} s")
    print(f"generation at validation: {', '.join(f'{g:.0f}' for g in generation)} s (median {statistics.median(generation):.0f} s)")
    print(f"cost of one validation's generation as a fraction of an epoch: {statistics.median(generation) / epoch_seconds:.2f}")


if __name__ == "__main__":
    main()
