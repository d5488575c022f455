"""Rank, world size and local rank from the launcher's variables (calm_dist/common/dist_env.py)."""

from __future__ import annotations

import pytest
import torch

from calm_dist.common.dist_env import DistEnv, read_dist_env, resolve_device

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
SLURM = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2"}


def test_torchrun_variables_win_over_slurms():
    # srun starting one torchrun per node: SLURM's variables count the torchruns, not the workers
    assert read_dist_env({**SLURM, **TORCHRUN}) == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)


def test_slurm_variables_when_torchruns_are_absent_or_empty():
    assert read_dist_env(SLURM) == DistEnv(rank=2, world_size=4, local_rank=0, local_world_size=2)
    assert read_dist_env({**SLURM, "RANK": "", "WORLD_SIZE": " "}) == DistEnv(rank=2, world_size=4, local_rank=0, local_world_size=2)


def test_a_single_process_without_any_launcher():
    assert read_dist_env({}) == DistEnv(rank=0, world_size=1, local_rank=0)


def test_reads_this_processs_environment_by_default(monkeypatch):
    for name in (*TORCHRUN, *SLURM):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert read_dist_env() == DistEnv(rank=0, world_size=3, local_rank=2)


def test_a_value_that_is_not_an_integer_is_named():
    with pytest.raises(ValueError, match="SLURM_PROCID='0-1'"):
        read_dist_env({"SLURM_PROCID": "0-1"})


def test_device_is_this_processs_gpu_unless_one_process_names_another():
    two_ranks = DistEnv(rank=1, world_size=2, local_rank=1)
    assert resolve_device("cpu", two_ranks) == torch.device("cpu")
    assert resolve_device("cuda", two_ranks) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", two_ranks) == torch.device("cuda", 1)  # not every rank on GPU 0
    assert resolve_device("cuda:3", DistEnv()) == torch.device("cuda", 3)
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto", two_ranks) == expected
