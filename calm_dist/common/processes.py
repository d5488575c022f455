"""Whether a process still runs (the run lock's holder, a sweep point's local job), and killing a
launch with everything it started (a timed-out bench or test launch, a simulated node crash)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil  # a DeepSpeed dependency


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie, dead but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): existence is all we can tell
    return state not in ("Z", "X")


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group when it leads one, and every process under it.

    torchrun starts each rank in a session of its own, so killing the launcher's group alone would
    leave the ranks running: waiting in a collective, holding memory and the launcher's pipes, or
    still writing checkpoints after a "crash". The descendants are listed before anything is
    killed, since once torchrun is gone its ranks are re-parented and can no longer be found."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
