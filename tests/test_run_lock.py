"""One live run per output directory: `calm_dist.training.run_lock`, alone and through calm-train."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from calm_dist.training.run_lock import LOCK_NAME, RunLock
from tests.train_utils import prepared_corpus_overrides, train


def _holder(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": 1, "slurm_job": None, **fields}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_the_lock_is_held_for_the_run_and_released(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, rank=0):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] > 0
        with pytest.raises(FileExistsError, match="in use by another run"):
            RunLock(run, rank=0).__enter__()  # a second launch while the first is live
    assert not run.exists()  # made by the lock, left empty: removed


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live, dead, other_host, requeued = (tmp_path / n for n in ("live", "dead", "other", "requeued"))
        _holder(live, pid=sleeper.pid)
        with pytest.raises(FileExistsError, match=str(live / LOCK_NAME)):
            RunLock(live, rank=0).__enter__()
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        _holder(dead, pid=int(finished.stdout))  # that process has exited
        with RunLock(dead, rank=0):
            pass
        _holder(other_host, host="another-node", pid=sleeper.pid)  # cannot be checked from here
        with pytest.raises(FileExistsError):
            RunLock(other_host, rank=0).__enter__()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _holder(requeued, host="another-node", pid=sleeper.pid, slurm_job="4242")  # our job, requeued
        with RunLock(requeued, rank=0):
            assert json.loads((requeued / LOCK_NAME).read_text())["slurm_job"] == "4242"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_calm_train_refuses_a_directory_another_live_run_holds(tmp_path):
    data = prepared_corpus_overrides(tmp_path / "data")
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _holder(out, pid=sleeper.pid)
        proc = train(data, "tiny_autoencoder", out, "training.train_steps=2", check=False)
        assert proc.returncode == 2 and "in use by another run" in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the lock kept
    finally:
        sleeper.kill()
        sleeper.wait()
    proc = train(data, "tiny_autoencoder", out, "training.train_steps=2", "training.eval_steps=0")
    assert not (out / LOCK_NAME).exists() and (out / "checkpoints" / "latest").is_file()


def test_an_empty_or_unreadable_lock_is_taken_over(tmp_path):
    """What an older calm-dist left when the disk filled while it wrote the lock: a 0-byte file."""
    for content in ("", "{not json"):
        run = tmp_path / f"run{len(content)}"
        run.mkdir()
        (run / LOCK_NAME).write_text(content)
        with RunLock(run, rank=0):
            assert json.loads((run / LOCK_NAME).read_text())["pid"] > 0


def test_a_zombie_holder_counts_as_gone_and_an_exiting_one_is_waited_for(tmp_path):
    """Right after kill -9, the killed rank 0 can be a zombie (dead, not yet reaped) or still
    exiting: the next launch takes the lock instead of refusing it."""
    import time

    from calm_dist.common.processes import pid_alive

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.05)
    try:
        assert not pid_alive(zombie.pid)  # exists for os.kill, yet it is gone
        _holder(tmp_path / "zombie", pid=zombie.pid)
        with RunLock(tmp_path / "zombie", rank=0, holder_wait_s=0):
            pass
    finally:
        zombie.wait()

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        _holder(tmp_path / "exiting", pid=exiting.pid)
        started = time.time()
        with RunLock(tmp_path / "exiting", rank=0, holder_wait_s=30):
            assert 1.0 < time.time() - started < 30  # waited for it, then took over
    finally:
        exiting.wait()
