"""One live run per output directory.

Two runs writing one `training.output_dir` corrupt each other: each one's rank 0 removes the
other's half-written `global_stepN.partial` as a leftover, and both replace `latest`. So rank 0
holds `<output_dir>/.run.lock` (created exclusively; who holds it: host, pid, SLURM job) for the
life of the run, and a second launch is refused before it touches anything.

A lock left by a run that died is taken over when it is provably stale: the same SLURM job id (a
requeued job: its earlier incarnation is gone) or, on the same host, a pid that no longer runs.
Otherwise the message says how to remove it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

LOCK_NAME = ".run.lock"


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _stale(holder: dict, me: dict) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True
    return holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))


class RunLock:
    """`with RunLock(output_dir, rank):` around a run; a collective on entry (every rank raises
    the same error when the directory is taken)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int):
        self.path = Path(run_dir) / LOCK_NAME
        self.rank = rank
        self.held = False
        self.created_dir = False  # made by us: removed again if the run leaves it empty

    def _try_acquire(self) -> str | None:
        """Rank 0: take the lock; None on success, else why not."""
        me = _identity()
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if holder and _stale(holder, me):
                    self.path.unlink(missing_ok=True)
                    continue
                return (f"{self.path.parent} is in use by another run ({holder or 'unreadable lock'}): two runs "
                        f"writing one training.output_dir would destroy each other's checkpoints. Choose another "
                        f"training.output_dir, or, if no run is using it any more, delete {self.path}")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return None
        return f"could not take {self.path}"

    def __enter__(self) -> "RunLock":
        error = self._try_acquire() if self.rank == 0 else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            message = [error]
            dist.broadcast_object_list(message, src=0)
            error = message[0]
        if error:
            raise FileExistsError(error)
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created_dir and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a refused run leaves no trace

