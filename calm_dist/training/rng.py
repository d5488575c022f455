"""Capture and restore every RNG stream a training step draws from, for exact resume.

CALM's loss samples (energy-head noise, posterior samples, dropout), so a resumed run only
continues bit-identically if each rank gets its own streams back: python `random`, numpy's global
RNG, torch's CPU and CUDA generators and megatron-core's RNG tracker (per-TP-rank dropout streams).

The captured state holds only plain containers, ints, floats, strings, None and torch tensors,
so `torch.load(path, weights_only=True)` reads it back.
"""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

logger = logging.getLogger(__name__)

_MCORE_RANDOM = "megatron.core.tensor_parallel.random"


def capture_rng_state() -> dict:
    """This process's RNG streams, as a `weights_only`-loadable dict."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch_cpu": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    tracker_states = _megatron_tracker_states()
    if tracker_states:
        state["megatron_tracker"] = tracker_states
    return state


def restore_rng_state(state: dict) -> None:
    """Set this process's RNG streams from `capture_rng_state()` output.

    Restore after the model is built: building megatron layers re-seeds the tracker.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    _restore_cuda(state.get("torch_cuda"))
    if "megatron_tracker" in state:
        _restore_megatron_tracker(state["megatron_tracker"])


def _restore_cuda(cuda_states: list | None) -> None:
    if not torch.cuda.is_available():
        if cuda_states:
            logger.warning("the saved RNG state has CUDA generators but CUDA is not available: not restored")
        return
    if not cuda_states:
        logger.warning("CUDA is available but the saved RNG state has no CUDA generators: not restored")
        return
    count = torch.cuda.device_count()
    if len(cuda_states) != count:
        logger.warning(
            "the saved RNG state has %d CUDA generators, this process sees %d devices: restoring the first %d",
            len(cuda_states), count, min(count, len(cuda_states)),
        )  # fmt: skip
    for device, generator_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(generator_state, device)


def _megatron_tracker_states() -> dict[str, torch.Tensor]:
    # A process that never imported megatron has no tracker states; importing it costs seconds.
    if _MCORE_RANDOM not in sys.modules:
        return {}
    tracker = sys.modules[_MCORE_RANDOM].get_cuda_rng_tracker()
    states = {}
    for name, generator_state in tracker.get_states().items():
        # A CUDA-graph-safe tracker keeps torch.Generator objects instead of state tensors.
        if isinstance(generator_state, torch.Generator):
            generator_state = generator_state.get_state()
        states[name] = generator_state.clone()
    return states


def _restore_megatron_tracker(saved: dict[str, torch.Tensor]) -> None:
    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    for name, generator_state in saved.items():
        if isinstance(states.get(name), torch.Generator):
            states[name].set_state(generator_state)
        else:
            states[name] = generator_state.clone()
    tracker.set_states(states)


class RngStreams:
    """Every RNG stream of this process as a checkpoint piece (`calm_dist.checkpoint.stateful`)."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)
