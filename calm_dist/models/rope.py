"""RoPE's angle table (CALM.md §2.3), computed on the device that asks for it.

megatron-core's RotaryEmbedding keeps its inverse frequencies outside the module's state and, at
its first forward, moves them to `torch.cuda.current_device()` whatever device the model is on:
a model evaluated on the CPU of a GPU machine (`calm-eval --device cpu`), or placed on a GPU other
than the current one, then fails with tensors on two devices. This is the same table, by the same
float32 operations (the inverse frequencies on the CPU, as megatron builds them for a model built
on the CPU), so the same numbers bit for bit (tested), wherever it is asked for.
"""

from __future__ import annotations

import torch


class RopeTable:
    """The angles of positions [0, steps) for one head size and base, on any device."""

    def __init__(self, head_dim: int, base: float):
        self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # One copy per device, made once: copying from the CPU at every forward would make the
        # host wait for the GPU's queued work each time.
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, steps: int, device: torch.device) -> torch.Tensor:
        """[steps, 1, 1, head_dim] float32 on `device`, each position's angles twice
        (non-interleaved halves), as megatron's attention takes them."""
        device = torch.device(device)
        inv_freq = self._inv_freq_on.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[device] = self.inv_freq.to(device)
        freqs = torch.outer(torch.arange(steps, dtype=torch.float32, device=device), inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
