"""Optimizer parameter groups (CALM.md §9.4): weight decay on matrices and embeddings only.

Biases and norm weights (every 1-D parameter) get none, as the reference's trainer does; frozen
parameters (the autoencoder inside CALM) are left out entirely.
"""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
