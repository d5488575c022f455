"""Megatron parallel state for code that builds megatron layers outside a launched job.

Tests, generation and single-process CPU runs still need what megatron layers expect to exist: a
`torch.distributed` group, megatron's `parallel_state`, and a seeded RNG tracker. This is the
"parallelism applied from outside": model modules never call it themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.compat.megatron_cpu import apply_cpu_compat


def ensure_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234):
    """Make megatron layers buildable in this process; idempotent.

    - no `torch.distributed` group yet: start a single-process one (world size 1) on an
      in-memory store, so no port or rendezvous is needed;
    - no CUDA: apply the CPU compatibility layer;
    - megatron `parallel_state` not initialised: initialise it with these sizes (an initialised
      one with other sizes is an error);
    - RNG tracker not seeded: `model_parallel_cuda_manual_seed(seed)`. Without CUDA this also
      seeds torch's CPU generator, because the "CUDA" RNG is the CPU one.
    """
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
        )
    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if sizes != (tensor_parallel, pipeline_parallel):
        raise ValueError(
            f"megatron parallel state already initialised with (TP, PP) = {sizes}, "
            f"not the requested {(tensor_parallel, pipeline_parallel)}"
        )

    if not mcore_random.get_cuda_rng_tracker().get_states():
        mcore_random.model_parallel_cuda_manual_seed(seed)
