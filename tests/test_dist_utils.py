"""The multi-process test launcher itself (tests/dist_utils.py)."""

from __future__ import annotations

import time

import psutil

from tests.dist_utils import run_worker


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_timed_out_launch_leaves_no_rank_running(tmp_path):
    """torchrun starts each rank in a session of its own: the timeout must kill the ranks too, not
    only torchrun's process group. Otherwise they run on (here for 2 minutes), and the launcher
    waits for them, as they hold its output pipes."""
    start = time.monotonic()
    result = run_worker("hang_worker", str(tmp_path), tmp_path=tmp_path, timeout=15, check=False)
    assert result.returncode == -9
    assert time.monotonic() - start < 45, "the launcher waited for ranks it should have killed"
    pids = [int((tmp_path / f"rank{rank}.pid").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once; allow the kernel a moment
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), [pid for pid in pids if _alive(pid)]
