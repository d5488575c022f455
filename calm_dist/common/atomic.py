"""Files that appear whole or not at all: written under a temporary sibling name, flushed to disk,
then renamed (or hard-linked) to their final name.

The temporary name is `<name><mark><pid>`: in the same directory, so the rename never crosses a
filesystem, and distinct per process, so two writers of one file never share a temporary file.
The mark lets a cleanup recognise what a killed writer left: the checkpoint manager removes
`latest.tmp*`, a data directory `*.partial*` (calm_dist/data/atomic.py). Files get the mode a plain
open() gives (the umask applies). A write that raises removes its temporary file.

`atomic_directory` does the same for a whole directory (an exported autoencoder, a converted
model): built under a temporary sibling name, then moved into place by one rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from calm_dist.common.processes import pid_alive

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


def _recover_directory(out_dir: Path, mark: str) -> None:
    """Undo what a writer killed inside `atomic_directory` left: the old directory set aside just
    before the final rename goes back in place if nothing replaced it; temporary directories of
    writers that are gone are deleted."""
    for kind in (".stale", mark):
        for leftover in sorted(out_dir.parent.glob(f".{out_dir.name}{kind}-*")):
            pid = leftover.name[len(f".{out_dir.name}{kind}-"):].split("-")[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            if kind == ".stale" and not out_dir.exists():
                os.rename(leftover, out_dir)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, mark: str = ".partial", replace: bool = True) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` fill `tmp`; on a normal exit its files are flushed to
    disk and it becomes `out` by a rename, so readers see the old directory or the whole new one.
    An existing `out` is renamed aside only then (and put back if the rename fails), and deleted
    after; `replace=False` refuses to replace one (FileExistsError, `tmp` removed). A writer
    killed between those two renames leaves the old directory aside, and the next
    `atomic_directory` of the same `out` puts it back. On an error `tmp` is removed and `out` is
    untouched. `tmp` is created with the umask's mode (not mkdtemp's 0700), so a shared run
    directory stays readable by the group."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_directory(out_dir, mark)
    tmp = out_dir.with_name(f".{out_dir.name}{mark}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    stale = None
    try:
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files, then the directories holding them
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif path.is_dir():
                fsync_dir(path)
        fsync_dir(tmp)
        if out_dir.exists():
            if not replace:
                raise FileExistsError(f"{out_dir} appeared while it was being written; nothing was replaced")
            stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(out_dir, stale)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if stale is not None:
                os.rename(stale, out_dir)
                stale = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_dir(out_dir.parent)
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
