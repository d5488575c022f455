"""One live run per output directory.

Two runs writing one `training.output_dir` corrupt each other: each one's rank 0 removes the
other's half-written `global_stepN.partial` as a leftover, and both replace `latest`. So rank 0
holds `<output_dir>/.run.lock` (created exclusively; who holds it: host, pid, SLURM job) for the
life of the run, and a second launch is refused before it touches anything.

A lock left by a run that died is taken over when it is provably stale: the same SLURM job id (a
requeued job: its earlier incarnation is gone) or, on the same host, a pid that no longer runs.
Otherwise the message says how to remove it by hand.

The lock appears whole or not at all: its content is written to a temporary file first, which is
then hard-linked to the lock's name (an exclusive create). So a full disk cannot leave an empty
lock behind; an empty or unreadable one (from an older calm-dist) is taken over. A pid that is a
zombie counts as gone, and a live holder on this host is waited for a few seconds before the
launch is refused: right after `kill -9`, rank 0 can still be exiting.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import torch.distributed as dist

from calm_dist.common.atomic import create_exclusive
from calm_dist.common.processes import pid_alive
from calm_dist.training.run_dir import foreign_entries, mark_run_dir, refusal

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
HOLDER_WAIT_S = 5.0  # how long a live holder on this host may take to exit before a refusal


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _stale(holder: dict, me: dict) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True
    return holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))


class RunLock:
    """`with RunLock(output_dir, rank):` around a run; a collective on entry (every rank raises
    the same error when the directory is taken, or is not a calm-dist output directory)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, holder_wait_s: float = HOLDER_WAIT_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.rank = rank
        self.holder_wait_s = holder_wait_s
        self.held = False
        self.created_dir = False  # made by us: removed again if the run leaves it empty

    def _try_acquire(self) -> str | None:
        """Rank 0: take the lock; None on success, else why not."""
        me = _identity()
        run_dir = self.path.parent
        foreign = foreign_entries(run_dir)
        if foreign:
            return refusal(run_dir, foreign)
        self.created_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        waited_until = time.monotonic() + self.holder_wait_s
        while True:
            try:
                self._create(me)
            except FileExistsError:
                holder = self._read_holder()
                if holder == {}:
                    continue  # released between our attempt and the read
                if holder is None or _stale(holder, me):
                    logger.warning("taking over %s, left by a run that is gone (%s)", self.path,
                                   holder or "empty or unreadable")
                    self.path.unlink(missing_ok=True)
                    continue
                if self._may_still_exit(holder, me) and time.monotonic() < waited_until:
                    time.sleep(0.5)
                    continue
                return (f"{run_dir} is in use by another run ({holder}): two runs writing one "
                        f"training.output_dir would destroy each other's checkpoints. Choose another "
                        f"training.output_dir, or, if no run is using it any more, delete {self.path}")
            except OSError as err:
                return self._unwritable(err)
            self.held = True
            try:
                mark_run_dir(run_dir)
            except OSError as err:
                return self._unwritable(err)
            return None

    def _create(self, me: dict) -> None:
        """The lock with its whole content, or FileExistsError: written aside, then hard-linked."""
        create_exclusive(self.path, json.dumps(me).encode())

    def _read_holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}  # released between our try and this read: try again
        except (OSError, ValueError):
            return None
        if not isinstance(holder, dict) or not holder:
            return None
        try:
            int(holder.get("pid", -1))
        except (TypeError, ValueError):
            return None
        return holder

    @staticmethod
    def _may_still_exit(holder: dict, me: dict) -> bool:
        """A live holder on this host, not this process: it may be on its way out."""
        return holder.get("host") == me["host"] and int(holder.get("pid", -1)) != me["pid"]

    def _unwritable(self, err: OSError) -> str:
        free = shutil.disk_usage(self.path.parent).free if self.path.parent.exists() else 0
        cause = "no space left on the device" if err.errno == errno.ENOSPC else f"{type(err).__name__}: {err}"
        self._release()
        return f"cannot write the run lock {self.path}: {cause} ({free / 2**20:.1f} MB free); nothing else was written"

    def __enter__(self) -> "RunLock":
        error = None
        if self.rank == 0:
            try:
                error = self._try_acquire()
            except OSError as err:  # e.g. the output path is a file, or not writable: say so on every rank
                self._release()
                error = f"cannot use {self.path.parent} as training.output_dir: {type(err).__name__}: {err}"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            message = [error]
            dist.broadcast_object_list(message, src=0)
            error = message[0]
        if error:
            raise FileExistsError(error)
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        run_dir = self.path.parent
        if self.created_dir and run_dir.is_dir():
            left = [e for e in run_dir.iterdir() if e.name != ".calm-dist-run"]
            if not left:  # a refused or empty run leaves no trace
                shutil.rmtree(run_dir, ignore_errors=True)

