"""This process's place in a multi-process job, read from the launcher's environment variables.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE and LOCAL_RANK; `srun` starting the
ranks itself sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID. Each value comes from torchrun's
variable, or from SLURM's when that one is absent or empty; with neither, a single process. Under
`srun ... torchrun` both are set and torchrun's are the right ones (SLURM's count torchruns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this node


def _first_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size and local rank from `environ` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    return DistEnv(rank=_first_int(env, ("RANK", "SLURM_PROCID"), 0),
                   world_size=_first_int(env, ("WORLD_SIZE", "SLURM_NTASKS"), 1),
                   local_rank=_first_int(env, ("LOCAL_RANK", "SLURM_LOCALID"), 0),
                   local_world_size=_first_int(env, ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"), 1))


def resolve_device(requested: str = "auto", env: DistEnv | None = None) -> torch.device:
    """The device for `requested` (auto | cpu | cuda | cuda:N): auto is CUDA when available, else
    the CPU. A CUDA device is this process's GPU, cuda:LOCAL_RANK, except that cuda:N names the GPU
    of a single process: with several, an index shared by all would put every rank on one GPU."""
    env = read_dist_env() if env is None else env
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and (device.index is None or env.world_size > 1):
        return torch.device("cuda", env.local_rank)
    return device
