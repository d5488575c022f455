"""Scaling-law sweeps (same as the `calm-sweep` console script; docs/sweeps.md).

    python tools/sweep.py plan sweep.yaml --out runs/ksweep
    python tools/sweep.py submit runs/ksweep --slurm --dry-run
    python tools/sweep.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from calm_dist.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
