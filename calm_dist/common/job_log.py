"""What a training job's log looks like: every line of ours names its rank and host, library
warnings appear once per job (on rank 0) and the known harmless ones not at all.

Without this a two-node job log is mostly noise: each rank prints megatron-core's "Apex / Transformer
Engine is not installed" warnings at import (the environment report at start-up already says which
backends run), and torch repeats a deprecation FutureWarning for every collective DeepSpeed issues
(another library's call, not ours; libraries that reset the warning filters make Python's
once-per-location rule forget it). A user who wants every warning back runs with
`PYTHONWARNINGS` or `-W` set: explicit warning options are left alone.
"""

from __future__ import annotations

import logging
import socket
import sys
import warnings

# Known harmless (message regexes): missing optional GPU extensions, which the environment
# report covers, and torch's deprecation of collectives DeepSpeed calls.
HARMLESS_WARNINGS = (
    r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)


_IGNORED_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
# Libraries whose INFO lines say how they were built ("Detected Megatron Core, ..."), not about the run.
_QUIET_LOGGERS = ("megatron",)


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def setup_job_logging(rank: int) -> None:
    """Logging for one rank of a job (rank 0 at INFO, the others WARNING and above), each line
    prefixed `[rank{R}@{host}]`, and the warning policy above. Call before importing the
    libraries: megatron-core warns at import."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}@{short_hostname()}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if sys.warnoptions:  # the user asked for a warning policy: theirs wins
        return
    if rank != 0:
        warnings.simplefilter("ignore")  # rank 0 shows each library warning for the job
        return
    warnings.simplefilter("once")  # by message text: survives libraries resetting the filters
    for category in _IGNORED_BY_DEFAULT:  # Python's own defaults, which "once" would override
        warnings.filterwarnings("ignore", category=category)
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
