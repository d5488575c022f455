"""Worker for tests/test_dist_utils.py: each rank writes `<out>/rank<R>.pid` and then hangs, as a
rank stuck in a collective would."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    out = Path(sys.argv[1])
    (out / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(120)
