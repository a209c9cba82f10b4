"""Every SFT loss on the quickstart setting (SmolLM2-135M-Instruct, built-in cold-start set, one seed, same steps).

    python experiments/aesl_variants.py                      # all losses, then the table
    python experiments/aesl_variants.py --losses ce aesl     # some of them
    python experiments/aesl_variants.py --report-only        # rewrite the table from finished runs

Each run is `python -m aesl_lightning fit --config experiments/quickstart.yaml` with `model.loss.name` set (and the
first reading of AESL with the quickstart's old thresholds 0.9 / 0.9 / rho 0), checkpoints and exports off, its
TensorBoard logs under `--logs`. The base model is validated once (`validate`, the same generation settings) as
the step-0 reference. Results: `experiments/results/aesl-variants/results.{json,md}`; a finished run is not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results" / "aesl-variants"
LOSSES = ["ce", "dft", "gem", "aesl_v1", "aesl", "aesl_anchor", "aesl_entropy_floor", "aesl_drift"]
# Measured here, then removed from the toolkit (their rows stay in the table, from their run records):
RETIRED = {"aesl_novelty": "token gate on p0(y_t); matched CE and aesl on every column, so it was removed"}
VAL_KEYS = ["val/answer_accuracy", "val/gen_entropy", "val/self_bleu", "val/distinct_2", "val/kl_to_base", "val/loss",
            "val/greedy_length", "val/pass@1", "val/pass@4"]
TRAIN_KEYS = ["train/learned_share", "train/loss_weight_mean", "train/update_norm", "train/anchor_kl", "train/learned_share_step0"]


def overrides(loss: str) -> list[str]:
    args = ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", f"--trainer.logger.init_args.name=variants/{loss}"]
    if loss == "base":
        return args
    args.append(f"--model.init_args.loss.name={loss}")
    if loss == "aesl_v1":  # the quickstart as it shipped before the default changed
        args += ["--model.init_args.loss.tau_tok=0.9", "--model.init_args.loss.tau_seq=0.9", "--model.init_args.loss.rho=0.0"]
    return args


def run(loss: str, work: Path, threads: int | None = None, logs: Path | None = None) -> dict:
    record = work / f"{loss}.json"
    if record.exists():
        return json.loads(record.read_text())
    logs = logs or work / "logs"
    stage = "validate" if loss == "base" else "fit"
    command = [sys.executable, "-m", "aesl_lightning", stage, "--config", "experiments/quickstart.yaml",
               f"--trainer.logger.init_args.save_dir={logs}", *overrides(loss)]
    started = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    (work / f"{loss}.log").write_text(done.stdout[-20000:] + "\n" + done.stderr[-20000:])
    if done.returncode != 0:
        raise RuntimeError(f"{loss}: exit {done.returncode}; see {work / f'{loss}.log'}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"loss": loss, "command": " ".join(command[1:]), "commit": commit, "finished": time.strftime("%Y-%m-%d %H:%M"),
              "load_average": os.getloadavg()[0], "seconds": round(seconds, 1), **read_scalars(logs / "variants" / loss)}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(record)
    return result


def read_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(folder.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    acc = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    series = {key: [(e.step, round(e.value, 5)) for e in acc.Scalars(key)] for key in VAL_KEYS + TRAIN_KEYS if key in tags}
    return {"series": series}


def summary(result: dict) -> dict:
    series = result["series"]
    last = lambda key: series[key][-1][1] if series.get(key) else None  # noqa: E731
    mean = lambda key: round(sum(v for _, v in series[key]) / len(series[key]), 4) if series.get(key) else None  # noqa: E731
    first = lambda key: series[key][0][1] if series.get(key) else None  # noqa: E731
    return {"loss": result["loss"], "answer_accuracy": last("val/answer_accuracy"), "gen_entropy": last("val/gen_entropy"),
            "self_bleu": last("val/self_bleu"), "distinct_2": last("val/distinct_2"),
            "pass_at_1": last("val/pass@1"), "pass_at_4": last("val/pass@4"), "kl_to_base": last("val/kl_to_base"),
            "val_loss": last("val/loss"), "learned_share_step0": first("train/learned_share_step0") or first("train/learned_share"),
            "learned_share_mean": mean("train/learned_share"), "learned_share_last": last("train/learned_share"),
            "update_norm_mean": mean("train/update_norm"), "train_anchor_kl_last": last("train/anchor_kl"), "seconds": result["seconds"]}


def write_report(results: list[dict], started: float, missing: list[str] = ()) -> None:
    rows = [summary(r) for r in results]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"command": "python experiments/aesl_variants.py " + " ".join(sys.argv[1:]), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg(),
            "wall_seconds_this_invocation": round(time.perf_counter() - started, 1)}
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=2))
    fmt = lambda v, pct=False: "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")  # noqa: E731
    lines = ["# Every SFT loss on the quickstart setting", "",
             "SmolLM2-135M-Instruct (full fine-tuning, fp32), the built-in arithmetic cold-start set (128 examples), seed 0, 32 steps of",
             "8 examples, lr 5e-5; validation at steps 16 and 32 (16 held-out prompts: greedy answer accuracy, 4 samples at",
             "temperature 1 for entropy, self-BLEU and distinct-2; KL to the base on the 32 validation completions). Values at",
             "step 32; `base` is the starting model validated with the same settings. Share learned = completion tokens with",
             "weight > 0.5 (step 0: measured on 8 training batches before training; mean: over the 32 steps). `val objective` is",
             "each loss's own objective on the validation completions (not comparable across losses). One seed and 16 prompts:",
             "an answer-accuracy difference of one prompt is 0.0625; nothing here is a significance claim.", "",
             f"Table written by `{meta['command']}` at commit `{commit[:10]}`; {meta['machine']}. Each run's command, commit (when",
             "recorded) and wall time are in `results.json`; other jobs shared the 2 cores during these runs (two runs at a time or",
             "beside other engineers' work), so the minutes column is not a speed measurement.", "",
             "`answer acc` is greedy; `pass@1` / `pass@4` are over the 4 samples per prompt (at temperature 1). `train KL` is the",
             "anchored losses' own KL(p0 || p_theta) term (`train/anchor_kl`) at the last step.", "",
             "| loss | answer acc | pass@1 | pass@4 | sampled entropy | self-BLEU | distinct-2 | KL to base | val objective | learned @0 | learned mean | learned last | update norm | train KL | min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['loss']} (removed)" if r["loss"] in RETIRED else r["loss"]
        lines.append(f"| {name} | {fmt(r['answer_accuracy'])} | {fmt(r.get('pass_at_1'))} | {fmt(r.get('pass_at_4'))} | {fmt(r['gen_entropy'])} | {fmt(r['self_bleu'])} | {fmt(r['distinct_2'])} | "
                     f"{fmt(r['kl_to_base'])} | {fmt(r['val_loss'])} | {fmt(r['learned_share_step0'], True)} | {fmt(r['learned_share_mean'], True)} | "
                     f"{fmt(r['learned_share_last'], True)} | {fmt(r['update_norm_mean'])} | {fmt(r['train_anchor_kl_last'])} | {r['seconds'] / 60:.1f} |")
    for loss, why in RETIRED.items():
        if any(r["loss"] == loss for r in rows):
            lines += ["", f"{loss} (removed): {why}."]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}. `python experiments/aesl_variants.py` runs them (finished runs are kept)."]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["base", *LOSSES], help="Which runs (base = validate the starting model).")
    parser.add_argument("--work", type=Path, default=OUT / "runs", help="Run records (one JSON per finished run).")
    parser.add_argument("--logs", type=Path, default=ROOT / "lightning_logs" / "aesl-variants", help="TensorBoard folders of the runs.")
    parser.add_argument("--report-only", action="store_true", help="Only rewrite the table from finished runs.")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (1 is faster on a machine shared with other jobs).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for loss in [*args.losses, *(RETIRED if args.report_only else ())]:
        record = args.work / f"{loss}.json"
        if args.report_only:
            if record.exists():
                results.append(json.loads(record.read_text()))
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {loss}", flush=True)
        results.append(run(loss, args.work, args.threads, args.logs))
    done = {r["loss"] for r in results}
    write_report(results, started, [loss for loss in args.losses if loss not in done])


if __name__ == "__main__":
    main()
