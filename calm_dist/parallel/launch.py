"""Process-group start-up for every launcher: torchrun, the deepspeed launcher, srun, or none.

World size 1 without any launcher works too (a single-process gloo group on an in-memory store).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from calm_dist.common.dist_env import read_dist_env, resolve_device

logger = logging.getLogger(__name__)

# How long the main thread lets collective worker threads finish freeing their last work objects
# before the interpreter may finalise (see shutdown_distributed).
_WORKER_THREAD_DRAIN_SECONDS = 0.25


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) and return this
    process's rank, world size and device. Idempotent."""
    env = read_dist_env()  # torchrun / deepspeed launcher variables, else plain srun's SLURM_*
    rank, world, local_rank = env.rank, env.world_size, env.local_rank
    use_cuda = resolve_device(device, env).type == "cuda"
    if use_cuda:
        # DeepSpeed puts its engine on cuda:LOCAL_RANK, so that is this process's GPU whatever
        # index `device` names.
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        # DeepSpeed would otherwise JIT-compile its shared-memory op (~1 minute) on the CPU
        # accelerator; plain gloo collectives are all a CPU run needs.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops  # lazy: deepspeed picks its accelerator on import, so after DS_ACCELERATOR

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # DeepSpeed's CPU accelerator counts its "devices" by running `numactl --hardware` unless
        # LOCAL_SIZE is set, and ZeRO-3 asks for that count at every gradient bucket it reduces:
        # dozens of subprocesses per step. The ranks on this node are the right answer anyway.
        os.environ.setdefault("LOCAL_SIZE", str(env.local_world_size))
        dev = torch.device("cpu")

    # DeepSpeed reads these even when the process group already exists.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if not dist.is_initialized():
        import deepspeed  # lazy: after DS_ACCELERATOR (above); calm-train validates its config first

        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(
                "nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
        else:
            deepspeed.init_distributed(
                dist_backend="nccl" if use_cuda else "gloo",
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(minutes=timeout_minutes),
            )
        if not deepspeed.comm.is_initialized():
            deepspeed.comm.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def shutdown_distributed(clean: bool) -> None:
    """Tear the process group down before the interpreter exits, so that a finished run exits 0.
    `clean`: every rank got here, so they first wait for each other; after an error a peer may be
    gone, so no collective.

    Why the pause at the end: a gloo worker thread frees a finished collective's work object a
    moment after the collective returns to Python, and that frees the Python tensors the work
    held, which needs the GIL. If the interpreter is already finalising by then, CPython ends the
    thread mid-destructor and C++ aborts the process ("terminate called without an active
    exception", SIGABRT: a failed job after a finished run; seen in about 1 of 25 two-rank runs on
    a loaded 2-core machine, always in Py_FinalizeEx). Neither destroy_process_group nor gloo's
    shutdown joins those threads, so the main thread releases the GIL for a moment instead."""
    if not dist.is_initialized():
        return
    try:
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as err:  # the run's outcome is decided; a teardown problem must not change it
        logging.getLogger(__name__).warning("process group teardown: %s: %s", type(err).__name__, err)
    time.sleep(_WORKER_THREAD_DRAIN_SECONDS)
