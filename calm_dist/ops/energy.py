"""Energy loss and energy score for CALM's generative head (CALM.md §2.5, §8 pitfalls 2-3, §9.10).

Shape legend: N model samples, M target samples, P positions, D latent dimension.

Distances are computed in fp32 from exact coordinate differences. `torch.cdist` is used only with
``compute_mode="donot_use_mm_for_euclid_dist"``: its default switches to the |a|^2 + |b|^2 - 2ab expansion for
more than 25 rows, which cancels catastrophically when the spread of the points is small against their norms.
cdist never materialises the D axis of the differences and keeps only its inputs and its (P, N, M) output for
backward, so the autograd memory of the fidelity term is P*N*M instead of the P*N*M*D of broadcast differences
(§8 pitfall 3); positions are additionally processed in chunks to bound the transient buffers. Its backward
(CPU and CUDA) returns 0 where a distance is exactly 0, which keeps coincident samples finite (§8 pitfall 2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Distances below this are clamped before pow(beta) for beta != 1: d^beta has an infinite slope at 0 for
# beta < 1, and clamping gives a zero (sub)gradient there instead of inf * 0 = NaN (§8 pitfall 1).
_MIN_DISTANCE = 1e-12


class EnergyLoss(NamedTuple):
    """Energy loss and its two terms, each a scalar mean over positions.

    loss = 2 * fidelity - diversity, the negative Monte-Carlo energy score averaged over positions.
    """

    loss: torch.Tensor
    fidelity: torch.Tensor
    diversity: torch.Tensor


def _pairwise_distance_pow(a_PND: torch.Tensor, b_PMD: torch.Tensor, beta: float) -> torch.Tensor:
    """||a_n - b_m||^beta for every position, shape (P, N, M), from exact differences."""
    distance_PNM = torch.cdist(a_PND, b_PMD, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    if beta == 1.0:
        return distance_PNM  # cdist's subgradient at 0 is 0, so coincident points are safe
    # where() keeps 0^beta exactly 0; the clamp keeps the unused branch's gradient finite (NaN * 0 is still NaN).
    powered_PNM = distance_PNM.clamp_min(_MIN_DISTANCE).pow(beta)
    return torch.where(distance_PNM > 0, powered_PNM, torch.zeros_like(powered_PNM))


def _off_diagonal_mean(square_PNN: torch.Tensor) -> torch.Tensor:
    """Mean over n != k of a (P, N, N) tensor: sum excluding the diagonal / (N(N-1)) (§8 pitfall 2)."""
    num_samples = square_PNN.shape[-1]
    off_diagonal_NN = ~torch.eye(num_samples, dtype=torch.bool, device=square_PNN.device)
    return (square_PNN * off_diagonal_NN).sum(dim=(-2, -1)) / (num_samples * (num_samples - 1))


def _fidelity_and_diversity(
    samples_PND: torch.Tensor, targets_PMD: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position fidelity mean_{n,m} ||z_n - y_m||^beta and diversity mean_{n!=k} ||z_n - z_k||^beta."""
    fidelity_P = _pairwise_distance_pow(samples_PND, targets_PMD, beta).mean(dim=(-2, -1))
    diversity_P = _off_diagonal_mean(_pairwise_distance_pow(samples_PND, samples_PND, beta))
    return fidelity_P, diversity_P


def _check_shapes(samples_NPD: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if samples_NPD.dim() != 3:
        raise ValueError(f"samples must be (N, P, D), got shape {tuple(samples_NPD.shape)}")
    if samples_NPD.shape[0] < 2:
        raise ValueError("the diversity term needs at least N=2 samples per position")
    if other.shape[-2:] != samples_NPD.shape[1:]:
        raise ValueError(
            f"{other_name} shape {tuple(other.shape)} does not match samples (N, P, D) = {tuple(samples_NPD.shape)}"
        )


def energy_loss(
    samples_NPD: torch.Tensor,
    targets_MPD: torch.Tensor,
    beta: float = 1.0,
    chunk_positions: int = 1024,
) -> EnergyLoss:
    """CALM energy loss (CALM.md §2.5), averaged over positions, computed in fp32.

    Per position: L = 2/(N M) sum_{n,m} ||z_n - y_m||^beta - 1/(N(N-1)) sum_{n!=k} ||z_n - z_k||^beta.
    Gradients flow to `samples_NPD` only; `targets_MPD` (AE posterior samples) are detached. Inputs may be bf16.
    """
    if targets_MPD.dim() != 3:
        raise ValueError(f"targets must be (M, P, D), got shape {tuple(targets_MPD.shape)}")
    _check_shapes(samples_NPD, targets_MPD, "targets")
    samples_PND = samples_NPD.float().transpose(0, 1)
    targets_PMD = targets_MPD.detach().float().transpose(0, 1)
    num_positions = samples_PND.shape[0]

    fidelity_sum = samples_PND.new_zeros(())
    diversity_sum = samples_PND.new_zeros(())
    for start in range(0, num_positions, chunk_positions):
        stop = start + chunk_positions
        fidelity_P, diversity_P = _fidelity_and_diversity(samples_PND[start:stop], targets_PMD[start:stop], beta)
        fidelity_sum = fidelity_sum + fidelity_P.sum()
        diversity_sum = diversity_sum + diversity_P.sum()

    fidelity = fidelity_sum / num_positions
    diversity = diversity_sum / num_positions
    return EnergyLoss(loss=2.0 * fidelity - diversity, fidelity=fidelity, diversity=diversity)


def energy_score(samples_NPD: torch.Tensor, observation_PD: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Unbiased Monte-Carlo energy score per position, positively oriented (higher is better), shape (P,).

    S = mean_{n!=k} ||x_n - x_k||^beta - 2 mean_n ||x_n - y||^beta, an unbiased estimate of
    E||X - X'||^beta - 2 E||X - y||^beta with X, X' ~ P i.i.d. Equals minus the energy loss with M = 1.
    """
    _check_shapes(samples_NPD, observation_PD, "observation")
    samples_PND = samples_NPD.float().transpose(0, 1)
    observation_P1D = observation_PD.detach().float().unsqueeze(1)
    fidelity_P, diversity_P = _fidelity_and_diversity(samples_PND, observation_P1D, beta)
    return diversity_P - 2.0 * fidelity_P
