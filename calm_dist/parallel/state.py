"""Megatron parallel state for code that builds megatron layers outside a launched job.

Tests, generation and single-process CPU runs still need what megatron layers expect to exist: a
`torch.distributed` group, megatron's `parallel_state`, and a seeded RNG tracker. This is the
"parallelism applied from outside": model modules never call it themselves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from calm_dist.compat.megatron_cpu import apply_cpu_compat


def ensure_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                          virtual_pipeline: int = 1, timeout_minutes: float = 30.0):
    """Make megatron layers buildable in this process; idempotent.

    - no `torch.distributed` group yet: start a single-process one (world size 1) on an
      in-memory store, so no port or rendezvous is needed;
    - no CUDA: apply the CPU compatibility layer;
    - megatron `parallel_state` not initialised: initialise it with these sizes (an initialised
      one with other sizes is an error);
    - RNG tracker not seeded: `model_parallel_cuda_manual_seed(seed)`. Without CUDA this also
      seeds torch's CPU generator, because the "CUDA" RNG is the CPU one.
    """
    # lazy: megatron-core takes ~2.5 s to import; checkpoint code uses ParallelLayout without it
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mcore_random

    if not torch.cuda.is_available():
        apply_cpu_compat()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
            distributed_timeout_minutes=timeout_minutes,  # the TP/PP/DP groups' collectives
        )
    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
    )
    if sizes != (tensor_parallel, pipeline_parallel, virtual_pipeline):
        raise ValueError(
            f"megatron parallel state already initialised with (TP, PP, VPP) = {sizes}, "
            f"not the requested {(tensor_parallel, pipeline_parallel, virtual_pipeline)}"
        )

    if not mcore_random.get_cuda_rng_tracker().get_states():
        mcore_random.model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: megatron orders ranks TP fastest, then DP, then PP."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule when > 1)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_parallel - 1


def current_layout() -> ParallelLayout:
    """This rank's layout from megatron's initialised parallel state."""
    from megatron.core import parallel_state as ps  # lazy: megatron-core ~2.5 s (see ensure_model_parallel)

    return ParallelLayout(
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        data_parallel=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        virtual_stages=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def model_init_seed(seed: int, layout: ParallelLayout) -> int:
    """The seed every rank uses while building its part of the model: the same across data-parallel
    replicas (identical initial weights) and across tensor ranks (replicated parameters agree;
    megatron's RNG tracker gives the TP shards their own streams); per stage, as megatron does."""
    return seed + 100 * layout.pp_rank


def training_seed(seed: int, layout: ParallelLayout) -> int:
    """The seed of the default generator once the weights exist. It draws the energy head's noise,
    the posterior samples of the targets and dropout outside tensor-parallel regions, so it is
    the same on the tensor ranks of one model replica (they compute one replica's activations)
    and different across data-parallel replicas and pipeline stages. Zero3 runs (TP = PP = 1)
    get seed + 1 + rank."""
    return seed + 1 + layout.dp_rank + 100_003 * layout.pp_rank


def seed_all(seed: int) -> None:
    """python, numpy and torch's default generators (the "CUDA" one too, on the CPU layer)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_model_building(seed: int, layout: ParallelLayout) -> None:
    """Before building the model: megatron's tracker (TP shards' init streams) and the default
    generators from `model_init_seed`."""
    from megatron.core.tensor_parallel import random as mcore_random  # lazy: megatron-core ~2.5 s (as above)

    mcore_random.model_parallel_cuda_manual_seed(model_init_seed(seed, layout), force_reset_rng=True)
    seed_all(model_init_seed(seed, layout))


def seed_training(seed: int, layout: ParallelLayout) -> None:
    """After building the model: every stream this rank samples from while training. The tracker's
    tensor-parallel dropout streams also differ across replicas and stages (megatron's seed is
    per stage; ours adds the replica), the default generators follow `training_seed`."""
    from megatron.core.tensor_parallel import random as mcore_random  # lazy: megatron-core ~2.5 s (as above)

    mcore_random.model_parallel_cuda_manual_seed(
        seed + 100 * layout.pp_rank + 10_007 * layout.dp_rank, force_reset_rng=True
    )
    seed_all(training_seed(seed, layout))
