"""Run `python -m aesl_lightning fit` and record what happened: the command, the commit, the wall time, the machine's
load (and the CPU the other processes used beside it), the validation series, the figure and the verdict.

    python scripts/record_run.py --config experiments/quickstart.yaml --out experiments/results/quickstart
    python scripts/record_run.py --config experiments/quickstart.yaml --out /tmp/q -- --trainer.max_steps 2

Everything after `--` goes to the fit command as LightningCLI overrides. The run's output streams to the terminal as
usual; at the end `<out>/run.json` holds the record and `<out>/diversity.png` a copy of the run's figure. The README's
quickstart figures (docs/quickstart.md, experiments/results/quickstart/) come from this command: rerun it to
refresh them. An `"idle": false` record was timed beside other work and says nothing about an idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aesl_lightning.study.report import read_json, write_json  # noqa: E402
from aesl_lightning.study.units import MachineProbe  # noqa: E402
from aesl_lightning.training.plots import read_scalars  # noqa: E402

RUN_DIR_LINE = re.compile(r"^\s*TensorBoard logs\s*:\s*(\S.*?)\s*$")
SERIES_PREFIXES = ("val/", "diversity/", "train/loss")
LOAD_EVERY_S = 30.0


class LoadSampler(threading.Thread):
    """The 1-minute load average every `every` seconds while the run lasts."""

    def __init__(self, every: float = LOAD_EVERY_S) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._stop_event = every, [], threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop_event.wait(self.every):
                return

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        s = self.samples
        return {"every_s": self.every, "n": len(s), "mean": round(sum(s) / len(s), 2), "min": min(s), "max": max(s)}


def run_fit(argv: list[str]) -> tuple[int, list[str]]:
    """Run the fit command, echoing its output; returns its exit code and output lines."""
    lines = []
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
    return proc.returncode, lines


SUMMARY_LINE = re.compile(r"^  \S")


def run_summary(lines: list[str]) -> list[str]:
    """RunSummary's block: its "Run finished" line and the lines indented by two spaces after it (the verdict is the
    last). What the progress bar redraws after it (a step line, deeper-indented metric columns) is not part of it."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Run finished")]
    if not starts:
        return []
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1:]:
        if not SUMMARY_LINE.match(line):
            break
        block.append(line)
    return block


def series_by_step(run_dir: Path) -> dict[str, dict[str, float]]:
    """Every `val/*`, `diversity/*` and `train/loss*` scalar of the run as `{step: {tag: value}}`."""
    out: dict[str, dict[str, float]] = {}
    for tag, (steps, values) in sorted(read_scalars(run_dir).items()):
        if tag.startswith(SERIES_PREFIXES):
            for step, value in zip(steps, values):
                out.setdefault(str(step), {})[tag] = round(float(value), 6)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the fit config (e.g. experiments/quickstart.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="folder for run.json and diversity.png")
    args = parser.parse_args(own)

    command = [sys.executable, "-m", "aesl_lightning", "fit", "--config", args.config, *extra]
    shown = " ".join(["python -m aesl_lightning fit --config", args.config, *extra])
    probe, sampler = MachineProbe(repo=ROOT), LoadSampler()
    sampler.start()
    started = time.time()
    rc, lines = run_fit(command)
    wall = time.time() - started
    machine, load = probe.finish(), sampler.stop()

    record = {"command": shown, "returncode": rc, "wall_seconds": round(wall, 1), "commit": machine["start"]["commit"],
              "machine": machine, "idle": not machine["busy"], "load_average": load,
              "threads": os.environ.get("OMP_NUM_THREADS") or f"default ({os.cpu_count()} cores)"}
    summary = run_summary(lines)
    run_dirs = [m.group(1) for line in summary if (m := RUN_DIR_LINE.match(line))]
    if rc != 0 or not run_dirs:
        record["error"] = "the fit failed" if rc != 0 else "no 'TensorBoard logs :' line in the run's summary"
        record["output_tail"] = lines[-40:]
        write_json(args.out / "run.json", record)
        print(f"{args.out / 'run.json'}: {record['error']}", file=sys.stderr)
        return rc or 1

    run_dir = (ROOT / run_dirs[-1]).resolve()
    series = series_by_step(run_dir)
    turning = run_dir / "turning_point" / "turning_point.json"
    record.update({
        "run_dir": run_dirs[-1],
        "validation_steps": [int(s) for s, tags in series.items() if any(t.startswith("val/") for t in tags)],
        "generation_seconds": {s: tags["val/generation_seconds"] for s, tags in series.items() if "val/generation_seconds" in tags},
        "run_summary": summary,
        "verdict": summary[-1].strip() if summary else None,
        "turning_point": read_json(turning) if turning.is_file() else None,
        "series_by_step": series,
    })
    figure = run_dir / "diversity.png"
    if figure.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, args.out / "diversity.png")
        record["figure"] = str(args.out / "diversity.png")
    write_json(args.out / "run.json", record)
    other = "" if machine["other_cores"] is None else f": other processes used {machine['other_cores']:.2f} cores on average"
    print(f"recorded: {args.out / 'run.json'} ({wall / 60:.1f} min, {'idle' if record['idle'] else 'beside other work'}{other})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
