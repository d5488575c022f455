"""Prepare tokenized WebDataset shards (same as the `calm-prepare-data` console script).

    python tools/prepare_data.py data/sotu --bundled --vocab-size 4096
    python tools/prepare_data.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from calm_dist.cli.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
