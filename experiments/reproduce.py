"""Reproduce the paper's question end to end: is a diversity-aware cold start a better starting point for RL?

    python experiments/reproduce.py --track cpu            # the whole CPU table (resumes finished units)
    python experiments/reproduce.py --track cpu --smoke    # the same pipeline, tiny sizes, ~2 minutes
    python experiments/reproduce.py --track gpu            # SmolLM2-135M-Instruct, sized for one GPU
    python experiments/reproduce.py --track cpu --ablation # set size x difficulty, CE vs AESL (ablation.md)

Pipeline (every stage is the toolkit itself: SFTModule, DiversityEarlyStopping, GRPOModule):

1. data: disjoint JSONL splits of the arithmetic task: a broad pre-training corpus (three prompt phrasings
   x three solution styles), a small cold-start set in one reasoning format, an SFT validation split, RL
   prompts, an in-distribution test split and a harder test split (more operations, bigger numbers).
2. base (CPU track): a few-million-parameter Llama-style model pre-trained from scratch on the corpus, so
   that it has a broad prior over solution styles before the cold start. The GPU track starts from
   SmolLM2-135M-Instruct instead.
3. SFT arms per seed: CE (one run gives three starting points: best validation answer accuracy, the end
   of training, and the diversity turning point chosen by DiversityEarlyStopping), DFT, and AESL with its
   thresholds chosen on the validation split by a small sweep (seed 0).
4. GRPO from every starting point (and from the base model), same budget, then evaluation on both test
   splits: greedy accuracy, pass@1 (mean over k samples) and pass@k (unbiased estimator).
5. Checkpoint sweep: GRPO from every validation snapshot of the seed-0 CE run; post-RL accuracy against
   the snapshot's SFT accuracy and SFT diversity, with Spearman rank correlations.
6. Report: `<out>/results.md`, `<out>/results.json`, figures, and the command, seeds, machine, wall time.

The sizes and hyper-parameters are in experiments/reproduce.yaml; the code in experiments/reproduction/. Each
finished unit writes `<out>/units/<id>.json` atomically (aesl_lightning.study); a rerun skips those, so an
interrupted track resumes, and the report is rebuilt from those files alone. Units go to a pool of worker processes
(`--workers`), each with `--threads` torch threads. Weights, logs and exports live under `--work` (git-ignored
`lightning_logs/reproduce/<track>` by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (HERE, REPO):  # `python experiments/reproduce.py` from a checkout without `pip install -e .`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from aesl_lightning.study.report import record_invocation, write_json  # noqa: E402
from aesl_lightning.study.schedule import parse_until  # noqa: E402
from reproduction import ablation, analysis, config, figures, report, study  # noqa: E402
from reproduction.stages import restore_shared_inputs  # noqa: E402



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=config.DEFAULT_CONFIG, help="the tracks' settings (default: %(default)s)")
    parser.add_argument("--track", default="cpu", help="which track of --config: cpu or gpu (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps of every stage, on CPU")
    parser.add_argument("--ablation", action="store_true", help="the set-size x difficulty ablation instead of the main table")
    parser.add_argument("--out", type=Path, help="unit records and reports (default: experiments/results/<track>[-smoke])")
    parser.add_argument("--work", type=Path, help="weights and logs (default: lightning_logs/reproduce/<track>[-smoke])")
    parser.add_argument("--workers", type=int, default=2, help="units in parallel (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the track's seeds")
    parser.add_argument("--until", help="start no unit that would end after this time (HH:MM UTC or an ISO date-time)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the units finished so far (an interrupted ablation, say)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tracks, estimates = config.load_tracks(args.config)
    if args.track not in tracks:
        raise SystemExit(f"{args.config}: no track {args.track!r} (tracks: {', '.join(sorted(tracks))})")
    track = tracks[args.track]
    if args.seeds:
        track = replace(track, seeds=tuple(args.seeds))
    if args.smoke:
        track = track.smoke()
    # the ablation shares the track's folders: its data, base model and unit records (its reports are ablation.*)
    paths = config.Paths(args.out or HERE / "results" / track.name, args.work or REPO / "lightning_logs" / "reproduce" / track.name)
    config.check_same_track(track, paths)
    restore_shared_inputs(track, paths)
    started = time.perf_counter()
    units = ablation.plan(track) if args.ablation else study.plan(track)
    if not args.report_only:
        if track.name not in estimates:
            raise SystemExit(f"{args.config}: estimates: no cost estimates for track {track.name!r}")
        study.run(track, paths, units, estimates[track.name], args.workers, args.threads, parse_until(args.until))
    missing = [u.id for u in units if not paths.store.done(u.id)]
    if missing and not args.ablation and args.report_only:
        raise SystemExit(f"{paths.out}: the main table needs every run finished; run without --report-only to finish them")
    wall = time.perf_counter() - started
    records = paths.store.records()
    meta = record_invocation(paths.out / ("ablation_meta.json" if args.ablation else "meta.json"),
                             "python experiments/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]), wall,
                             ran=not args.report_only, settings={"workers": args.workers, "threads": args.threads},
                             totals={"run_minutes": sum(records[u.id]["machine"]["seconds"] for u in units if u.id in records) / 60}, repo=REPO)
    if missing and not args.ablation:
        print(f"{len(missing)} units not run before the deadline ({', '.join(missing[:5])}, ...); the report waits for them")
        return
    results = {k: r["result"] for k, r in records.items()}
    if args.ablation:
        summary = analysis.ablation_summary(track, units, results)
        write_json(paths.out / "ablation.json", {"table": summary["table"], "meta": meta})
        figures.write_ablation_figure(paths.out, summary)
        out, text = paths.out / "ablation.md", report.ablation_markdown(track, summary, meta)
    else:
        summary = analysis.summarise(track, results)
        write_json(paths.out / "results.json", {"summary": summary, "meta": meta})
        figures.write_figures(paths.run_dir(f"sft-ce-s{track.seeds[0]}"), paths.out, summary)
        out, text = paths.out / "results.md", report.results_markdown(track, summary, meta)
    out.write_text(text)
    print(f"wrote {out} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
