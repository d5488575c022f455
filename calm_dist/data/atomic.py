"""Files that appear whole or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a
    prefix of it: readers never see a half-written shard or index under its final name."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def remove_partials(directory: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes in `directory`; returns what was removed."""
    removed = sorted(Path(directory).glob("*" + PARTIAL_SUFFIX))
    for path in removed:
        path.unlink()
    return removed
