"""A rank started by torchrun exits when its launcher dies.

torchrun starts each rank in a session of its own, so a scheduler that kills a job by process group
(SLURM's proctrack/pgid, or an agent killed after KillWait while it waits out its shutdown timeout)
kills the agent and leaves the rank running: an orphan that holds its memory and GPU, and waits in a
collective until the collective timeout (default 30 minutes) while the job's next incarnation starts
beside it. Such a rank can do nothing useful (the agent hosted its store, and is its only way back
into a job), so it stops as soon as it notices its parent is gone.

Only under torchrun (TORCHELASTIC_RUN_ID is set): a process started from a shell keeps running when
that shell goes (nohup), as a user expects.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

EXIT_CODE = 1  # a failure: what a rank that lost its job is


def _watch(parent: int, interval_s: float, stopped: threading.Event) -> None:
    while not stopped.wait(interval_s):
        if os.getppid() != parent:  # re-parented: the launcher is gone
            logger.error("the launcher (torchrun, pid %d) died: this rank exits (exit %d) rather than run on "
                         "as an orphan", parent, EXIT_CODE)
            logging.shutdown()
            os._exit(EXIT_CODE)  # no cleanup: collectives with the lost job would only hang


class LauncherWatch:
    """Context manager: while active, a daemon thread checks every `interval_s` seconds whether the
    process that launched this rank still runs, and ends the process when it does not."""

    def __init__(self, interval_s: float = 1.0, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("TORCHELASTIC_RUN_ID"))
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LauncherWatch:
        if self.enabled:
            self._thread = threading.Thread(target=_watch, args=(os.getppid(), self.interval_s, self._stopped),
                                            name="launcher-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
