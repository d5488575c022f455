"""Weight initialisation shared by every calm-dist module (CALM.md §9.2).

Each module initialises its own children in its constructor; there is deliberately no global
init pass, so nothing can overwrite the energy head's zero-initialised output layer or a loaded
autoencoder (CALM.md §8.5).
"""

from __future__ import annotations

from torch import nn


def init_llama_(module: nn.Module, std: float) -> None:
    """Normal(0, std) for every Linear and Embedding weight, zero biases, unit norm weights."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)):
            if sub.weight is not None:
                nn.init.ones_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
