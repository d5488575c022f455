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
def pairwise_cosine_tensor(states_PD: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs of distinct rows of (P, D), in O(P D), as a 0-dim fp32
    tensor on the states' device (no host sync inside a training step):
    |sum of unit rows|^2 = P + sum over ordered pairs i != j of cos(i, j). With fewer than 2 rows
    there is no pair: 0."""
    count = states_PD.shape[0]
    if count < 2:
        return torch.zeros((), device=states_PD.device)
    units = torch.nn.functional.normalize(states_PD.detach().float(), dim=-1)
    return (units.sum(dim=0).square().sum() - count) / (count * (count - 1))


def mean_pairwise_cosine(states_PD: torch.Tensor) -> float:
    """`pairwise_cosine_tensor` as a Python float."""
    return float(pairwise_cosine_tensor(states_PD))
