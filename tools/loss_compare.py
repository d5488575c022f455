#!/usr/bin/env python3
"""Compare a run's training losses with a golden file (or rewrite the golden file).

    python tools/loss_compare.py RUN_DIR tests/golden/tiny_baseline.json [--rtol 1e-3]
    python tools/loss_compare.py RUN_DIR tests/golden/tiny_baseline.json --update --note "why"
"""

from __future__ import annotations

import argparse
import sys

from calm_dist.training.golden import compare_losses, write_golden


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("golden")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--update", action="store_true", help="write the run's losses as the new golden file")
    parser.add_argument("--note", default="", help="with --update: how the golden run was made")
    args = parser.parse_args(argv)
    if args.update:
        write_golden(args.run_dir, args.golden, args.note)
        print(f"wrote {args.golden}")
        return 0
    problems = compare_losses(args.run_dir, args.golden, args.rtol)
    for line in problems:
        print(line)
    print("losses match the golden file" if not problems else f"{len(problems)} step(s) differ")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
