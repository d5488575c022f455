"""Make megatron-core's transformer layers run on a machine without CUDA.

Why: megatron-core 0.16.1 assumes a GPU even where the maths does not need one. Its layers ask
`torch.cuda.current_device()` for buffers and RoPE tables, build the default causal mask with a
literal `device="cuda"`, and its RNG tracker (`model_parallel_cuda_manual_seed`, dropout forks,
`tensor_parallel.checkpoint`) reads and writes the CUDA generator. Without a GPU every one of these
raises "Torch not compiled with CUDA enabled".

What `apply_cpu_compat()` patches, once, only when `torch.cuda.is_available()` is False:
- `torch.cuda.current_device()` answers the CPU device; `torch.cuda.synchronize()` does nothing;
- the CUDA RNG calls (`torch.cuda[.random].get_rng_state/set_rng_state/manual_seed`, and
  megatron's `tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`) use the CPU
  generator, so "CUDA" and CPU RNG are the same stream (megatron then logs "CPU RNG state changed
  within GPU RNG context" around dropout: expected);
- torch's tensor factories turn a CUDA `device=` into the CPU and drop `pin_memory=True`;
  `Tensor.cuda()` returns the tensor itself and `Tensor.to("cuda")` stays on the CPU;
- megatron's `clip_grad_by_total_norm_fp32` asserts that every gradient is a CUDA tensor (the
  only CUDA-specific line in it): the patched one is the same scaling without that assertion.

The factories are plain wrappers, not a `TorchFunctionMode`: such a mode is popped while
`autograd.Function.apply` runs, so the allocations inside megatron's `CheckpointFunction.forward`
would escape it.

This is deliberately process-wide monkeypatching: apply it once, before megatron models are
built, in processes that will never see a GPU. With CUDA present it does nothing.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger(__name__)

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_strided",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
)  # fmt: skip
_CPU = torch.device("cpu")
_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return wrapper


def _tensor_to_cpu(original_to):
    @functools.wraps(original_to)
    def to(self, *args, **kwargs):
        args = tuple(_CPU if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return original_to(self, *args, **kwargs)

    return to


def _clip_grad_by_total_norm_fp32(clip_grads):
    """megatron's `clip_grads.clip_grad_by_total_norm_fp32` without its CUDA-tensor assertion:
    the same coefficient and the same multi-tensor scaling."""

    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if grads and clip_coeff < 1.0:
            overflow = torch.zeros(1, dtype=torch.int)
            clip_grads.multi_tensor_applier(clip_grads.multi_tensor_scale_impl, overflow, [grads, grads], clip_coeff)

    return clip


def apply_cpu_compat() -> bool:
    """Patch torch (and megatron's RNG helpers) for CPU use; True if this call patched."""
    global _applied
    if _applied or torch.cuda.is_available():
        return False
    # lazy: megatron-core takes ~2.5 s to import; parallel.state (so checkpoint reading) imports this module
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mcore_random

    # TorchScript-compiled at import (ZeroRedundancyOptimizer's functional optimizers): scripting
    # reads the source of every torch function they call, which the wrappers below do not have.
    importlib.import_module("torch.distributed.optim")

    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.to = _tensor_to_cpu(torch.Tensor.to)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for namespace in (torch.cuda, torch.cuda.random):
        namespace.get_rng_state = lambda device=None: torch.get_rng_state()
        namespace.set_rng_state = lambda new_state, device=None: torch.set_rng_state(new_state)
        namespace.manual_seed = lambda seed: torch.manual_seed(seed)
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *a, **kw: torch.set_rng_state(new_state)
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32(clip_grads)
    _applied = True
    logger.info("megatron-core CPU compatibility layer applied (no CUDA device)")
    return True
