"""Files that appear whole or not at all: written under a temporary sibling name, flushed to disk,
then renamed (or hard-linked) to their final name.

The temporary name is `<name><mark><pid>`: in the same directory, so the rename never crosses a
filesystem, and distinct per process, so two writers of one file never share a temporary file.
The mark lets a cleanup recognise what a killed writer left: the checkpoint manager removes
`latest.tmp*`, a data directory `*.partial*` (calm_dist/data/atomic.py). Files get the mode a plain
open() gives (the umask applies). A write that raises removes its temporary file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

TEMP_MARK = ".tmp"


def temp_sibling(path: Path, mark: str = TEMP_MARK) -> Path:
    return path.with_name(f"{path.name}{mark}{os.getpid()}")


def _write_synced(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # on disk before any name points at it


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, mark: str = TEMP_MARK) -> Path:
    """Fill `path` through `write(binary_file)` (e.g. `lambda f: torch.save(obj, f)`), so that a crash
    leaves the old file or the new one, never a prefix of the new one."""
    path = Path(path)
    tmp = temp_sibling(path, mark)
    try:
        _write_synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mark: str = TEMP_MARK) -> Path:
    return atomic_write(path, lambda f: f.write(data), mark=mark)


def atomic_write_text(path: str | os.PathLike, text: str, *, mark: str = TEMP_MARK) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mark=mark)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, mark: str = TEMP_MARK) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n", mark=mark)


def create_exclusive(path: str | os.PathLike, data: bytes, *, mark: str = TEMP_MARK) -> Path:
    """Create `path` holding all of `data`, or raise FileExistsError if it exists. The hard link is
    the exclusive create, so a full disk or a crash never leaves an empty or partial file there."""
    path = Path(path)
    tmp = temp_sibling(path, mark)
    try:
        _write_synced(tmp, lambda f: f.write(data))
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside directory `path` durable (a file's fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
