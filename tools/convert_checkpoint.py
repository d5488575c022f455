"""Convert, inspect and compare checkpoints (same as the `calm-convert` console script).

    python tools/convert_checkpoint.py convert runs/quickstart/calm exports/calm
    python tools/convert_checkpoint.py inspect exports/calm
    python tools/convert_checkpoint.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from calm_dist.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
