"""Atomic file writes (calm_dist/common/atomic.py) and the data directories' leftover cleanup."""

from __future__ import annotations

import os

import pytest

from calm_dist.common.atomic import atomic_write, atomic_write_json, create_exclusive
from calm_dist.data.atomic import atomic_write_bytes as data_write_bytes
from calm_dist.data.atomic import remove_partials


def test_writes_through_a_per_process_temp_sibling_with_the_umask_mode(tmp_path):
    path = tmp_path / "latest"
    seen = []
    atomic_write(path, lambda f: (seen.extend(os.listdir(tmp_path)), f.write(b"global_step3")))
    assert seen == [f"latest.tmp{os.getpid()}"]
    assert path.read_bytes() == b"global_step3" and os.listdir(tmp_path) == ["latest"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_json(tmp_path / "job.json", {"step": 1}, indent=2)

    def fail(f):
        f.write(b"half")
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space"):
        atomic_write(path, fail)
    assert path.read_text() == '{\n  "step": 1\n}\n' and os.listdir(tmp_path) == ["job.json"]


def test_create_exclusive_never_replaces(tmp_path):
    lock = create_exclusive(tmp_path / ".run.lock", b'{"pid": 1}')
    with pytest.raises(FileExistsError):
        create_exclusive(lock, b'{"pid": 2}')
    assert lock.read_bytes() == b'{"pid": 1}' and os.listdir(tmp_path) == [".run.lock"]


def test_data_directories_mark_temps_partial_and_remove_them(tmp_path):
    data_write_bytes(tmp_path / "train-000000.tar", b"shard")
    leftovers = ["train-000001.tar.partial", f"train-000002.tar.partial{os.getpid() + 1}"]
    for name in [*leftovers, "notes.partial.txt"]:
        (tmp_path / name).write_bytes(b"half")
    assert [p.name for p in remove_partials(tmp_path)] == leftovers
    assert sorted(os.listdir(tmp_path)) == ["notes.partial.txt", "train-000000.tar"]
    assert remove_partials(tmp_path / "missing") == []


def test_a_directory_appears_whole_replaces_the_old_one_only_when_complete_and_keeps_the_umask(tmp_path):
    from calm_dist.common.atomic import atomic_directory

    out = tmp_path / "autoencoder"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("half")
            assert tmp.parent == out.parent and not (out / "new.txt").exists()  # built beside, not in place
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder"]  # nothing left over
    assert (out / "old.txt").read_text() == "old"  # the old directory is untouched

    old_umask = os.umask(0o022)
    try:
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("whole")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder"]
    assert [p.name for p in out.iterdir()] == ["new.txt"] and (out / "new.txt").read_text() == "whole"
    assert out.stat().st_mode & 0o777 == 0o755  # the umask's mode, not mkdtemp's 0700


def test_a_writer_killed_between_the_two_renames_is_undone_by_the_next_one(tmp_path):
    import subprocess
    import sys

    from calm_dist.common.atomic import atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    out = tmp_path / "autoencoder"
    aside = tmp_path / f".autoencoder.stale-{dead}-0a1b2c3d"  # the old export, set aside, then the kill
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    half = tmp_path / f".autoencoder.partial-{dead}-0a1b2c3d"  # the new one, never renamed
    half.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(out):
            raise RuntimeError("this writer fails too")
    assert (out / "old.txt").read_text() == "old"  # the old directory is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder"]  # the leftovers are gone

    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with atomic_directory(out, replace=False) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
