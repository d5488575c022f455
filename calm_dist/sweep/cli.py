"""calm-sweep: plan, submit, follow, collect and fit a scaling-law sweep (docs/sweeps.md).

    calm-sweep plan sweep.yaml --out runs/ksweep
    calm-sweep submit runs/ksweep --slurm --dry-run      # print the sbatch array command and script
    calm-sweep submit runs/ksweep --slurm                # or --local: one point after another
    calm-sweep status runs/ksweep
    calm-sweep collect runs/ksweep --out runs/ksweep/results.csv
    calm-sweep fit runs/ksweep/results.csv --metric brierlm --plot runs/ksweep/frontier.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from calm_dist.sweep.plan import fmt_tokens, read_plan, write_plan
from calm_dist.sweep.spec import SweepError, load_spec


def _plan(args) -> int:
    points = write_plan(load_spec(args.sweep), Path(args.out), force=args.force)
    for p in points:
        print(f"{p['name']:<48} params {p['params']:>13,}  steps {p['train_steps']:>7}  "
              f"tokens {fmt_tokens(p['tokens']):>6}  FLOPs {p['flops_per_token'] * p['tokens']:.3g}")
    print(f"{len(points)} points planned in {args.out}")
    return 0


def _submit(args) -> int:
    # lazy: torch (~1 s); each command imports only what it runs
    from calm_dist.sweep.runner import run_local, submit_slurm

    if args.slurm:
        return submit_slurm(Path(args.dir), dry_run=args.dry_run, force=args.force)
    failed = run_local(Path(args.dir), dry_run=args.dry_run, force=args.force)
    return 1 if failed else 0


def _status(args) -> int:
    from calm_dist.sweep.state import sweep_states  # lazy: torch (~1 s), via training.run_lock; as _submit

    _, points = read_plan(Path(args.dir))
    counts: dict[str, int] = {}
    for p, (state, step, job) in zip(points, sweep_states(Path(args.dir), points)):
        counts[state] = counts.get(state, 0) + 1
        where = f"  job {job['job_id']}" if job and job.get("job_id") else ""
        print(f"{p['name']:<48} {state:<10} step {step}/{p['train_steps']}{where}")
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def _collect(args) -> int:
    from calm_dist.sweep.collect import collect_rows, write_csv  # lazy: torch (~1 s); as _submit

    rows = collect_rows(Path(args.dir))
    out = write_csv(rows, Path(args.out))
    done = sum(r["state"] == "finished" for r in rows)
    print(f"{len(rows)} points ({done} finished) -> {out}")
    return 0


def _fit(args) -> int:
    from calm_dist.sweep.fit import fit_csv  # lazy: numpy (~0.2 s); as _submit

    if not Path(args.csv).is_file():
        raise SweepError(f"{args.csv} does not exist: run `calm-sweep collect` first")
    fits, groups, notes = fit_csv(Path(args.csv), args.metric, args.include_unfinished)
    for note in notes:
        print(f"note: {note}")
    print(f"power-law fits of {args.metric} against training compute C (FLOPs):")
    for f in fits:
        print("  " + f.summary())
    if not fits:
        print("  none: every group needs points at 2 or more compute values")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in vars(f).items()} for f in fits], indent=2))
    if args.plot:
        from calm_dist.sweep.plot import frontier_plot  # lazy: numpy and matplotlib, for --plot only

        print(f"plot -> {frontier_plot(fits, groups, args.metric, Path(args.plot))}")
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calm-sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="one run directory per grid point (validated before anything is written)")
    p.add_argument("sweep", help="the sweep file (YAML)")
    p.add_argument("--out", required=True, help="the sweep directory")
    p.add_argument("--force", action="store_true", help="rewrite a different existing plan (run outputs kept)")
    p.set_defaults(func=_plan)
    p = sub.add_parser("submit", help="run the points locally or as one SLURM job array")
    p.add_argument("dir", help="a planned sweep directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="train the points here, one after another (default)")
    mode.add_argument("--slurm", action="store_true", help="one sbatch --array job for all points")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would run or be submitted")
    p.add_argument("--force", action="store_true", help="also (re)submit finished, running and pending points")
    p.set_defaults(func=_submit)
    p = sub.add_parser("status", help="each point's state and step")
    p.add_argument("dir")
    p.set_defaults(func=_status)
    p = sub.add_parser("collect", help="results of every point to CSV")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="the CSV file to write")
    p.set_defaults(func=_collect)
    p = sub.add_parser("fit", help="power-law fits against compute, per K and for the baseline")
    p.add_argument("csv", help="a CSV from `collect`")
    p.add_argument("--metric", choices=("brierlm", "loss", "train_loss"), default="brierlm",
                   help="loss: final eval loss (CE for the baseline, energy loss for CALM)")
    p.add_argument("--plot", help="write the frontier plot (PNG) here")
    p.add_argument("--json", help="write the fits as JSON here")
    p.add_argument("--include-unfinished", action="store_true", help="also fit points that did not finish")
    p.set_defaults(func=_fit)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SweepError as err:
        print(f"calm-sweep: error: {err}", file=sys.stderr)
        if os.environ.get("CALM_DIST_DEBUG") == "1":
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
