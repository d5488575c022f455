"""Energy loss / energy score against closed forms (CALM.md §2.5, §8 pitfalls 2-3, §9.10).

Statistical checks compare a Monte-Carlo mean with its exact expectation within 5 standard errors, estimated from
independent replicates (positions are independent replicates of the per-position estimator). With fixed seeds
the outcome is deterministic; 5 sigma makes a false failure for another seed very unlikely (~6e-7 each).
"""

import math

import pytest
import torch

from calm_dist.ops import EnergyLoss, energy_loss, energy_score

Z_BOUND = 5.0


def folded_normal_mean(mean: float, std: float) -> float:
    """E|W| for W ~ N(mean, std^2)."""
    return std * math.sqrt(2 / math.pi) * math.exp(-(mean**2) / (2 * std**2)) + mean * math.erf(
        mean / (std * math.sqrt(2))
    )


def assert_within_standard_errors(replicates: torch.Tensor, expected: float) -> None:
    replicates = replicates.double()
    standard_error = replicates.std().item() / math.sqrt(replicates.numel())
    deviation = replicates.mean().item() - expected
    assert abs(deviation) < Z_BOUND * standard_error, (replicates.mean().item(), expected, standard_error)


# (a) 1-D Gaussians -------------------------------------------------------------------------------------------


def test_energy_score_matches_gaussian_closed_form():
    generator = torch.Generator().manual_seed(0)
    mean, std, observation, num_samples, num_positions = 0.3, 1.7, 1.1, 8, 20_000
    samples_NPD = mean + std * torch.randn(num_samples, num_positions, 1, generator=generator)
    observation_PD = torch.full((num_positions, 1), observation)

    score_P = energy_score(samples_NPD, observation_PD)

    expected = 2 * std / math.sqrt(math.pi) - 2 * folded_normal_mean(mean - observation, std)
    assert score_P.shape == (num_positions,)
    assert_within_standard_errors(score_P, expected)


@pytest.mark.parametrize("beta", [1.0])
def test_energy_loss_against_gaussian_target_distribution(beta):
    generator = torch.Generator().manual_seed(1)
    mean_p, std_p, mean_q, std_q = 0.0, 1.0, 0.8, 0.5
    num_samples, num_targets, num_groups, positions_per_group = 8, 16, 50, 100
    num_positions = num_groups * positions_per_group
    samples_NPD = mean_p + std_p * torch.randn(num_samples, num_positions, 1, generator=generator)
    targets_MPD = mean_q + std_q * torch.randn(num_targets, num_positions, 1, generator=generator)

    # Group means are i.i.d. replicates of the batch loss, which gives the standard error.
    groups = [
        energy_loss(samples_NPD[:, g::num_groups], targets_MPD[:, g::num_groups], beta) for g in range(num_groups)
    ]

    expected_fidelity = folded_normal_mean(mean_p - mean_q, math.hypot(std_p, std_q))
    expected_diversity = 2 * std_p / math.sqrt(math.pi)
    assert_within_standard_errors(torch.stack([g.fidelity for g in groups]), expected_fidelity)
    assert_within_standard_errors(torch.stack([g.diversity for g in groups]), expected_diversity)
    assert_within_standard_errors(torch.stack([g.loss for g in groups]), 2 * expected_fidelity - expected_diversity)


# (b) point masses and (f) normalisation -----------------------------------------------------------------------


def test_point_masses_exact():
    samples_NPD = torch.tensor([3.0, 4.0]).expand(5, 2, 2).clone()  # 5 identical samples at (3, 4), 2 positions
    targets_MPD = torch.zeros(7, 2, 2)
    for beta in (1.0, 1.5):
        result = energy_loss(samples_NPD, targets_MPD, beta)
        assert isinstance(result, EnergyLoss)
        assert result.fidelity.item() == pytest.approx(5.0**beta, rel=1e-6)
        assert result.diversity.item() == 0.0
        assert result.loss.item() == pytest.approx(2 * 5.0**beta, rel=1e-6)


def test_two_point_exact_values():
    samples_NPD = torch.tensor([0.0, 1.0]).view(2, 1, 1)
    targets_MPD = torch.tensor([0.0, 3.0]).view(2, 1, 1)
    result = energy_loss(samples_NPD, targets_MPD, beta=1.0)
    # |0-0|, |0-3|, |1-0|, |1-3| -> mean 1.5; diversity (1 + 1) / (2 * 1) = 1.
    assert (result.fidelity.item(), result.diversity.item(), result.loss.item()) == (1.5, 1.0, 2.0)
    result_beta2 = energy_loss(samples_NPD, targets_MPD, beta=2.0)
    assert result_beta2.fidelity.item() == pytest.approx((0 + 9 + 1 + 4) / 4)
    # energy_score is minus the loss for one observation
    score = energy_score(samples_NPD, torch.tensor([[3.0]]))
    assert score.item() == pytest.approx(1.0 - 2 * (3 + 2) / 2)


def test_diversity_normalised_by_n_times_n_minus_one():
    samples_NPD = torch.tensor([0.0, 0.0, 2.0]).view(3, 1, 1)  # two identical samples plus one other
    result = energy_loss(samples_NPD, torch.zeros(1, 1, 1))
    # ordered pairs n != k: (0,0) twice -> 0, four pairs at distance 2 -> sum 8, over N(N-1) = 6 (not N^2 = 9)
    assert result.diversity.item() == pytest.approx(8 / 6, rel=1e-7)


# (c) minimising the loss recovers the target distribution -------------------------------------------------------


def test_minimising_energy_loss_recovers_gaussian_parameters():
    torch.manual_seed(0)  # Adam has no randomness, but keep the run reproducible anyway
    generator = torch.Generator().manual_seed(2)
    true_mean_D = torch.tensor([1.5, -0.5])
    true_std_D = torch.tensor([0.5, 2.0])
    mean_D = torch.zeros(2, requires_grad=True)
    log_std_D = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([mean_D, log_std_D], lr=0.05)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[300, 400], gamma=0.2)
    num_samples, num_targets, num_positions = 8, 16, 128

    for _ in range(500):
        noise_NPD = torch.randn(num_samples, num_positions, 2, generator=generator)
        samples_NPD = mean_D + log_std_D.exp() * noise_NPD  # reparameterised location-scale family
        targets_MPD = true_mean_D + true_std_D * torch.randn(num_targets, num_positions, 2, generator=generator)
        optimizer.zero_grad()
        energy_loss(samples_NPD, targets_MPD).loss.backward()
        optimizer.step()
        schedule.step()

    # The energy score is strictly proper (beta in (0, 2)), so the population minimiser is the target itself;
    # the tolerance covers the optimiser's stochastic fluctuation at the final learning rate (errors <= 0.02
    # over seeds 0-7).
    torch.testing.assert_close(mean_D.detach(), true_mean_D, atol=0.05, rtol=0)
    torch.testing.assert_close(log_std_D.detach().exp(), true_std_D, atol=0, rtol=0.05)


# (d) finite gradients at zero distances --------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 1.5, 0.5])
def test_gradients_finite_when_samples_coincide(beta):
    # Zero-initialised head: all N samples identical, and some targets equal to the samples.
    samples_NPD = torch.zeros(8, 4, 3, requires_grad=True)
    targets_MPD = torch.randn(10, 4, 3, generator=torch.Generator().manual_seed(3))
    targets_MPD[:3] = 0.0
    energy_loss(samples_NPD, targets_MPD, beta).loss.backward()
    assert torch.isfinite(samples_NPD.grad).all()

    samples_equal_targets_NPD = targets_MPD[:8].clone().requires_grad_(True)
    energy_loss(samples_equal_targets_NPD, targets_MPD[:8].clone(), beta).loss.backward()
    assert torch.isfinite(samples_equal_targets_NPD.grad).all()

    observation_PD = torch.zeros(4, 3)
    samples_score_NPD = torch.zeros(8, 4, 3, requires_grad=True)
    energy_score(samples_score_NPD, observation_PD, beta).sum().backward()
    assert torch.isfinite(samples_score_NPD.grad).all()


def test_gradient_value_with_identical_samples():
    # Samples all at 0, targets all at 1 (1-D): only fidelity has gradient, d loss / d z_n = 2/N * (z_n - y)/|z_n - y|.
    num_samples = 4
    samples_NPD = torch.zeros(num_samples, 1, 1, requires_grad=True)
    energy_loss(samples_NPD, torch.ones(5, 1, 1)).loss.backward()
    torch.testing.assert_close(samples_NPD.grad, torch.full((num_samples, 1, 1), -2 / num_samples))


def test_targets_receive_no_gradient():
    samples_NPD = torch.randn(4, 3, 2, requires_grad=True)
    targets_MPD = torch.randn(5, 3, 2, requires_grad=True)
    energy_loss(samples_NPD, targets_MPD).loss.backward()
    assert targets_MPD.grad is None
    assert samples_NPD.grad is not None


# (e) chunking, precision, dtype ------------------------------------------------------------------------------------


def test_chunked_equals_unchunked():
    generator = torch.Generator().manual_seed(4)
    samples_NPD = torch.randn(8, 37, 16, generator=generator)
    targets_MPD = torch.randn(20, 37, 16, generator=generator)
    results, grads = [], []
    for chunk in (1024, 5, 1):
        leaf_NPD = samples_NPD.clone().requires_grad_(True)
        result = energy_loss(leaf_NPD, targets_MPD, chunk_positions=chunk)
        result.loss.backward()
        results.append(torch.stack(list(result)).detach())
        grads.append(leaf_NPD.grad)
    for other_result, other_grad in zip(results[1:], grads[1:]):
        torch.testing.assert_close(other_result, results[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(other_grad, grads[0], rtol=1e-6, atol=1e-7)


def test_exact_differences_stay_accurate_for_tiny_spread_at_large_norm():
    generator = torch.Generator().manual_seed(5)
    num_samples, num_targets, num_positions, dim = 8, 100, 3, 16

    def near_1e3_with_tiny_spread(*shape):
        return (1e3 + 1e-3 * torch.randn(*shape, generator=generator, dtype=torch.float64)).float()

    samples_NPD = near_1e3_with_tiny_spread(num_samples, num_positions, dim)
    targets_MPD = near_1e3_with_tiny_spread(num_targets, num_positions, dim)

    # Ground truth in float64 from the very same fp32 inputs.
    samples64_PND, targets64_PMD = samples_NPD.double().transpose(0, 1), targets_MPD.double().transpose(0, 1)
    fidelity_true = (samples64_PND[:, :, None] - targets64_PMD[:, None]).norm(dim=-1).mean().item()
    pair_distances_PNN = (samples64_PND[:, :, None] - samples64_PND[:, None]).norm(dim=-1)
    diversity_true = (pair_distances_PNN.sum((1, 2)) / (num_samples * (num_samples - 1))).mean().item()

    result = energy_loss(samples_NPD, targets_MPD)
    assert result.fidelity.item() == pytest.approx(fidelity_true, rel=1e-5)
    assert result.diversity.item() == pytest.approx(diversity_true, rel=1e-5)

    # The |a|^2 + |b|^2 - 2ab expansion in fp32 (what torch.cdist does by default for > 25 rows) is far off.
    samples_PND, targets_PMD = samples_NPD.transpose(0, 1), targets_MPD.transpose(0, 1)
    squared_PNM = (
        samples_PND.pow(2).sum(-1, keepdim=True)
        + targets_PMD.pow(2).sum(-1).unsqueeze(1)
        - 2 * samples_PND @ targets_PMD.transpose(1, 2)
    )
    fidelity_expanded = squared_PNM.clamp_min(0).sqrt().mean().item()
    fidelity_cdist_default = torch.cdist(samples_PND, targets_PMD).mean().item()
    assert abs(fidelity_expanded / fidelity_true - 1) > 0.1
    assert abs(fidelity_cdist_default / fidelity_true - 1) > 0.1


def test_bf16_inputs_computed_in_fp32():
    generator = torch.Generator().manual_seed(6)
    samples_NPD = torch.randn(8, 5, 4, generator=generator).bfloat16()
    targets_MPD = torch.randn(12, 5, 4, generator=generator).bfloat16()
    result_bf16 = energy_loss(samples_NPD, targets_MPD)
    result_fp32 = energy_loss(samples_NPD.float(), targets_MPD.float())
    assert result_bf16.loss.dtype == torch.float32
    torch.testing.assert_close(torch.stack(list(result_bf16)), torch.stack(list(result_fp32)))


def test_shape_errors():
    with pytest.raises(ValueError, match="at least N=2"):
        energy_loss(torch.zeros(1, 3, 2), torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="does not match"):
        energy_loss(torch.zeros(2, 3, 2), torch.zeros(4, 2, 2))
