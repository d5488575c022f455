"""The collapse alarm's measure: how alike the backbone's final states are across positions.

A CALM whose backbone maps every context to (nearly) the same state can only give its head the
marginal distribution of the next vector: its energy sits at the unconditional level for good
(docs/learning.md). The mean pairwise cosine of the states over a batch is ~0.0-0.3 for a backbone
that tells contexts apart and -> 1 when it collapses.
"""

from __future__ import annotations

import torch

COLLAPSE_COSINE = 0.95  # above this the states are one direction plus noise (docs/learning.md)


@torch.no_grad()
def mean_pairwise_cosine(states_PD: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of (P, D), in O(P D):
    |sum of unit rows|^2 = P + sum over ordered pairs i != j of cos(i, j)."""
    units = torch.nn.functional.normalize(states_PD.detach().float(), dim=-1)
    count = units.shape[0]
    if count < 2:
        return float("nan")
    total = units.sum(dim=0).square().sum()
    return float((total - count) / (count * (count - 1)))
