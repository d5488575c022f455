"""The energy-based generative head (CALM.md §2.4): (hidden state, uniform noise) -> one latent.

Single-step: one forward pass gives one sample; N samples are N copies of the hidden state with
independent noise. Shapes: P positions, D hidden, L latent size, E noise size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_dist.models.init import init_llama_, whole

_LN_EPS = 1e-6


class FusionBlock(nn.Module):
    """Residual MLP block that re-reads the hidden state c in every block (~6 D^2 parameters)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=_LN_EPS)
        self.fuse = nn.Linear(2 * d, d)
        self.mix = nn.Linear(d, d)
        self.gate_up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(d, d)

    def forward(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        t = self.fuse(torch.cat([self.norm(s), c], dim=-1))
        t = self.mix(F.silu(t))
        gate, up = self.gate_up(F.silu(t)).chunk(2, dim=-1)
        return s + self.down(F.silu(gate) * up)


class EnergyHead(nn.Module):
    def __init__(self, hidden_size: int, latent_size: int, noise_size: int, num_blocks: int, init_std: float):
        super().__init__()
        d = hidden_size
        self.noise_size = noise_size
        self.noise_proj = nn.Linear(noise_size, d)
        self.noise_norm = nn.LayerNorm(d, eps=_LN_EPS)
        self.hidden_proj = nn.Linear(d, d)
        self.hidden_norm = nn.LayerNorm(d, eps=_LN_EPS)
        self.blocks = nn.ModuleList(FusionBlock(d) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=_LN_EPS)
        self.final_hidden = nn.Linear(d, d)
        self.output = nn.Linear(d, latent_size)
        init_llama_(self, init_std)
        # Zero output: at init every sample coincides and only the fidelity term has a gradient
        # (CALM.md §8.9). Nothing re-initialises it later: there is no global init pass.
        with whole(self.output.parameters()):
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def draw_noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Uniform U[-0.5, 0.5]^E noise (not Gaussian), from the default generator of the device."""
        return torch.rand(*shape, self.noise_size, device=like.device, dtype=like.dtype) - 0.5

    def forward(self, h_PD: torch.Tensor, noise_NPE: torch.Tensor) -> torch.Tensor:
        """One latent per noise draw; h (..., D) broadcasts against noise (N, ..., E)."""
        c = self.hidden_norm(self.hidden_proj(h_PD))  # once per position, shared by the N samples
        s = self.noise_norm(self.noise_proj(noise_NPE))
        c = c.expand(*s.shape[:-1], c.shape[-1])
        for block in self.blocks:
            s = block(s, c)
        return self.output(F.silu(self.final_hidden(self.final_norm(s))))

    def sample(self, h_PD: torch.Tensor, num_samples: int) -> torch.Tensor:
        """N independent samples per position: (N, P, L)."""
        return self(h_PD, self.draw_noise((num_samples, *h_PD.shape[:-1]), h_PD))
