"""Every SFT loss on the quickstart setting (SmolLM2-135M-Instruct, built-in cold-start set, one seed, same steps).

    python experiments/aesl_variants.py                      # all losses, then the table
    python experiments/aesl_variants.py --losses ce aesl     # some of them
    python experiments/aesl_variants.py --report-only        # rewrite the table from finished runs

Each run is `python -m aesl_lightning fit --config experiments/quickstart.yaml` with `model.loss.name` set (and the
first reading of AESL with the quickstart's old thresholds 0.9 / 0.9 / rho 0), checkpoints and exports off, its
TensorBoard logs under `--logs`. The base model is validated once (`validate`, the same generation settings) as
the step-0 reference. Each run is a unit of the study library (`aesl_lightning.study`): one record per finished run
in `experiments/results/aesl-variants/units/<loss>.json` (command, series, the commit and load at its start and end,
the digest of quickstart.yaml it ran under), a finished run is not rerun, and `results.{json,md}` are rebuilt from
the records alone. The table's settings text describes the committed runs (quickstart.yaml as of their commit); a run
made under another quickstart.yaml is flagged in the table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without an install
    sys.path.insert(0, str(ROOT))

from aesl_lightning.study.report import markdown_table, record_invocation, write_json  # noqa: E402
from aesl_lightning.study.schedule import parse_until  # noqa: E402
from aesl_lightning.study.units import Unit, UnitStore, run_units  # noqa: E402

OUT = ROOT / "experiments" / "results" / "aesl-variants"
LOSSES = ["ce", "dft", "gem", "aesl_v1", "aesl", "aesl_anchor", "aesl_entropy_floor", "aesl_drift"]
# Measured here, then removed from the toolkit (their rows stay in the table, from their run records):
RETIRED = {"aesl_novelty": "token gate on p0(y_t); matched CE and aesl on every column, so it was removed"}
VAL_KEYS = ["val/answer_accuracy", "val/gen_entropy", "val/self_bleu", "val/distinct_2", "val/kl_to_base", "val/loss",
            "val/greedy_length", "val/pass@1", "val/pass@4"]
ESTIMATES = {"fit": 900.0, "validate": 600.0}  # seconds per run until idle records replace them (quickstart, 2 cores)
TRAIN_KEYS = ["train/learned_share", "train/loss_weight_mean", "train/update_norm", "train/anchor_kl", "train/learned_share_step0"]


def overrides(loss: str) -> list[str]:
    args = ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", f"--trainer.logger.init_args.name=variants/{loss}"]
    if loss == "base":
        return args
    args.append(f"--model.init_args.loss.name={loss}")
    if loss == "aesl_v1":  # the quickstart as it shipped before the default changed
        args += ["--model.init_args.loss.tau_tok=0.9", "--model.init_args.loss.tau_seq=0.9", "--model.init_args.loss.rho=0.0"]
    return args


def unit_list(losses: list[str]) -> list[Unit]:
    """One unit per loss; `base` validates the starting model (the step-0 reference)."""
    return [Unit(loss, "validate" if loss == "base" else "fit", (), {"loss": loss}) for loss in losses]


def execute(unit: Unit, threads: int | None, logs: Path) -> dict:
    """One quickstart run as a subprocess (`python -m aesl_lightning fit|validate ...`); the result is its command and
    the TensorBoard series the table reads. A failed run raises (no record: it reruns next time)."""
    loss = unit.params["loss"]
    command = [sys.executable, "-m", "aesl_lightning", unit.kind, "--config", "experiments/quickstart.yaml",
               f"--trainer.logger.init_args.save_dir={logs}", *overrides(loss)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    logs.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    (logs / f"{loss}.log").write_text(done.stdout[-20000:] + "\n" + done.stderr[-20000:])
    if done.returncode != 0:
        raise RuntimeError(f"{loss}: exit {done.returncode}; see {logs / f'{loss}.log'}")
    return {"loss": loss, "command": " ".join(command[1:]), "quickstart_sha256": quickstart_digest(), **read_scalars(logs / "variants" / loss)}


def quickstart_digest() -> str:
    return hashlib.sha256((ROOT / "experiments" / "quickstart.yaml").read_bytes()).hexdigest()[:12]


def read_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(folder.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    acc = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    series = {key: [(e.step, round(e.value, 5)) for e in acc.Scalars(key)] for key in VAL_KEYS + TRAIN_KEYS if key in tags}
    return {"series": series}


def summary(record: dict) -> dict:
    result = record["result"]
    series = result["series"]
    last = lambda key: series[key][-1][1] if series.get(key) else None  # noqa: E731
    mean = lambda key: round(sum(v for _, v in series[key]) / len(series[key]), 4) if series.get(key) else None  # noqa: E731
    first = lambda key: series[key][0][1] if series.get(key) else None  # noqa: E731
    return {"loss": result["loss"], "answer_accuracy": last("val/answer_accuracy"), "gen_entropy": last("val/gen_entropy"),
            "self_bleu": last("val/self_bleu"), "distinct_2": last("val/distinct_2"),
            "pass_at_1": last("val/pass@1"), "pass_at_4": last("val/pass@4"), "kl_to_base": last("val/kl_to_base"),
            "val_loss": last("val/loss"), "learned_share_step0": first("train/learned_share_step0") or first("train/learned_share"),
            "learned_share_mean": mean("train/learned_share"), "learned_share_last": last("train/learned_share"),
            "update_norm_mean": mean("train/update_norm"), "train_anchor_kl_last": last("train/anchor_kl"),
            "seconds": record["machine"]["seconds"], "busy": record["machine"].get("busy")}


def write_report(store: UnitStore, order: list[str], command: str, wall_seconds: float, ran: bool) -> list[str]:
    """results.json / results.md from the unit records alone (rows in `order`, then any other recorded unit)."""
    records = store.records()
    ids = [i for i in order if i in records] + sorted(set(records) - set(order))
    rows = [summary(records[i]) for i in ids]
    meta = record_invocation(OUT / "meta.json", command, wall_seconds, ran, repo=ROOT)
    write_json(OUT / "results.json", {"rows": rows, "units": ids})
    fmt = lambda v, pct=False: "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")  # noqa: E731
    busy = [r["loss"] for r in rows if r["busy"]]
    lines = ["# Every SFT loss on the quickstart setting", "",
             "SmolLM2-135M-Instruct (full fine-tuning, fp32), the built-in arithmetic cold-start set (128 examples), seed 0, 32 steps of",
             "8 examples, lr 5e-5; validation at steps 16 and 32 (16 held-out prompts: greedy answer accuracy, 4 samples at",
             "temperature 1 for entropy, self-BLEU and distinct-2; KL to the base on the 32 validation completions). Values at",
             "step 32; `base` is the starting model validated with the same settings. Share learned = completion tokens with",
             "weight > 0.5 (step 0: measured on 8 training batches before training; mean: over the 32 steps). `val objective` is",
             "each loss's own objective on the validation completions (not comparable across losses). One seed and 16 prompts:",
             "an answer-accuracy difference of one prompt is 0.0625; nothing here is a significance claim.", "",
             f"Rebuilt from `units/*.json` alone (`python experiments/aesl_variants.py --report-only`; last written at commit",
             f"`{meta['commit']}`, {meta['machine']}). Each unit's record holds its command, the commit and load at its start",
             "and end (where recorded) and its wall time. "
             + (f"Runs timed beside other work (all those made before the records carried a machine probe: {', '.join(busy)}): "
                "their minutes are not a speed measurement." if busy else "All runs were timed on an idle machine."), "",
             "`answer acc` is greedy; `pass@1` / `pass@4` are over the 4 samples per prompt (at temperature 1). `train KL` is the",
             "anchored losses' own KL(p0 || p_theta) term (`train/anchor_kl`) at the last step.", ""]
    header = ["loss", "answer acc", "pass@1", "pass@4", "sampled entropy", "self-BLEU", "distinct-2", "KL to base", "val objective",
              "learned @0", "learned mean", "learned last", "update norm", "train KL", "min"]
    lines += markdown_table(header, [
        [f"{r['loss']} (removed)" if r["loss"] in RETIRED else r["loss"], fmt(r["answer_accuracy"]), fmt(r.get("pass_at_1")), fmt(r.get("pass_at_4")),
         fmt(r["gen_entropy"]), fmt(r["self_bleu"]), fmt(r["distinct_2"]), fmt(r["kl_to_base"]), fmt(r["val_loss"]),
         fmt(r["learned_share_step0"], True), fmt(r["learned_share_mean"], True), fmt(r["learned_share_last"], True),
         fmt(r["update_norm_mean"]), fmt(r["train_anchor_kl_last"]), f"{r['seconds'] / 60:.1f}"] for r in rows])
    for loss, why in RETIRED.items():
        if loss in records:
            lines += ["", f"{loss} (removed): {why}."]
    digests = sorted({str(records[i]["result"].get("quickstart_sha256", "before digests were recorded")) for i in ids})
    if len(digests) > 1:
        lines += ["", f"Warning: these runs were made under {len(digests)} versions of experiments/quickstart.yaml ({', '.join(digests)});",
                  "rows from different versions are not comparable (see each unit's record)."]
    missing = [i for i in order if i not in records and i not in RETIRED]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}. `python experiments/aesl_variants.py` runs them (finished runs are kept)."]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["base", *LOSSES], help="Which runs (base = validate the starting model).")
    parser.add_argument("--logs", type=Path, default=ROOT / "lightning_logs" / "aesl-variants", help="TensorBoard folders and run logs.")
    parser.add_argument("--report-only", action="store_true", help="Only rewrite the table from the unit records.")
    parser.add_argument("--until", help="Start no run that would end after this time (HH:MM UTC or ISO).")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (1 is faster on a machine shared with other jobs).")
    args = parser.parse_args(argv)
    store = UnitStore(OUT)
    started = time.perf_counter()
    ran: list[str] = []
    if not args.report_only:
        ran = run_units(unit_list(args.losses), store, lambda u: execute(u, args.threads, args.logs), ESTIMATES,
                        deadline=parse_until(args.until), repo=ROOT)
    command = "python experiments/aesl_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print("\n".join(write_report(store, [*args.losses, *RETIRED], command.strip(), time.perf_counter() - started, bool(ran))))


if __name__ == "__main__":
    main()
