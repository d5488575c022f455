"""Atomic files in data directories (shards, index.json): calm_dist/common/atomic.py with the
temporary names marked `.partial`, which a preparation that starts removes (`remove_partials`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from calm_dist.common import atomic

PARTIAL_SUFFIX = ".partial"
# "x.partial<pid>" from atomic writes; plain "x.partial" from writers that name it themselves.
_PARTIAL_NAME = re.compile(r".+" + re.escape(PARTIAL_SUFFIX) + r"\d*")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Readers never see a half-written shard or index under its final name."""
    return atomic.atomic_write_bytes(path, data, mark=PARTIAL_SUFFIX)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic.atomic_write_json(path, obj, mark=PARTIAL_SUFFIX)


def remove_partials(directory: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes in `directory`; returns what was removed."""
    candidates = Path(directory).glob(f"*{PARTIAL_SUFFIX}*")  # none when the directory does not exist
    removed = sorted(p for p in candidates if _PARTIAL_NAME.fullmatch(p.name))
    for path in removed:
        path.unlink()
    return removed
