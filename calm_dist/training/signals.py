"""Graceful stop: SLURM's warning signals and a wall-clock budget become a "save and exit" request.

SLURM sends SIGTERM before preemption or at the time limit (then SIGKILL after `KillWait`), and
SIGUSR1 when a job asks for it with `#SBATCH --signal=USR1@<seconds>`. The handlers only record the
signal; the trainer polls `agreed_reason()` once per step, so every rank stops after the same step,
saves a checkpoint and exits 0 (SLURM can then requeue the job).

The wall-clock budget trips a little early, at `budget - margin` with margin = min(5 minutes, 5 % of
the budget), so that the step in flight and the final checkpoint still fit inside the budget.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

WALL_CLOCK = "wall-clock budget"
# Reasons by priority: all ranks agree on the highest code any rank saw (0 means "keep going").
_REASONS = (None, WALL_CLOCK, "SIGUSR1", "SIGTERM")
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_MAX_MARGIN_S = 300.0
_MARGIN_FRACTION = 0.05


class StopRequest:
    """Context manager: while active, SIGTERM/SIGUSR1 set a stop flag instead of killing the process.

    `start_time` (a `time.time()` value) defaults to construction; pass an earlier one, e.g. when the
    process started, to count start-up against the budget. `wall_clock_minutes <= 0` means no budget.
    """

    def __init__(self, wall_clock_minutes: float = 0.0, start_time: float | None = None):
        budget_s = 60.0 * wall_clock_minutes
        self._deadline = None
        if budget_s > 0:
            start = time.time() if start_time is None else start_time
            self._deadline = start + budget_s - min(_MAX_MARGIN_S, _MARGIN_FRACTION * budget_s)
        self._signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("StopRequest entered outside the main thread: signals are not handled")
            return self
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best guess.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        self._signal_name = signal.Signals(signum).name
        logger.warning("received %s: will save a checkpoint and stop after this step", self._signal_name)

    def reason(self) -> str | None:
        """Why this rank should stop: a signal name, "wall-clock budget", or None to keep going."""
        if self._signal_name is not None:
            return self._signal_name
        if self._deadline is not None and time.time() >= self._deadline:
            return WALL_CLOCK
        return None

    def agreed_reason(self, group=None) -> str | None:
        """The most urgent reason any rank has (a collective: every rank must call it at the same step)."""
        code = _REASONS.index(self.reason())
        if not (dist.is_available() and dist.is_initialized()):
            return _REASONS[code]
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([code], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return _REASONS[int(flag.item())]
