"""Likelihood-free temperature sampling (CALM.md §4, §9.9, §9.12) on a known discrete distribution.

Outcomes are rows of a small LongTensor, so equality is row equality as for K-token chunks.
"""

import math
from fractions import Fraction

import pytest
import torch
from scipy.stats import chisquare

from calm_dist.sampling import (
    batch_temperature_sample,
    batch_weights,
    exact_temperature_sample,
    expected_draws,
    parse_temperature,
)

OUTCOMES_X3 = torch.tensor([[0, 1, 2], [0, 1, 3], [1, 0, 0], [2, 2, 2], [0, 0, 1], [3, 1, 2]])
PROBS_X = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05], dtype=torch.float64)


def make_draw(generator: torch.Generator):
    def draw(count: int) -> torch.Tensor:
        return OUTCOMES_X3[torch.multinomial(PROBS_X, count, replacement=True, generator=generator)]

    return draw


def outcome_index(sample_3: torch.Tensor) -> int:
    return int((OUTCOMES_X3 == sample_3).all(dim=1).nonzero())


def tempered(probs_X: torch.Tensor, temperature: float) -> torch.Tensor:
    powered_X = probs_X.pow(1.0 / temperature)
    return powered_X / powered_X.sum()


# parse_temperature --------------------------------------------------------------------------------------------------


def test_parse_temperature():
    assert parse_temperature(1 / 3) == (3, Fraction(0))  # 1/(1/3) = 3.0000000000000004 in floating point
    assert parse_temperature("1/3") == (3, Fraction(0))
    assert parse_temperature(Fraction(2, 5)) == (2, Fraction(1, 2))
    assert parse_temperature(0.6) == (1, Fraction(2, 3))
    assert parse_temperature(1) == (1, Fraction(0))
    assert parse_temperature(1.0) == (1, Fraction(0))
    assert parse_temperature("0.5") == (2, Fraction(0))
    for n in range(1, 200):
        assert parse_temperature(1 / n) == (n, Fraction(0))
    for bad in (0, 0.0, -0.5, 1.5, "3/2"):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            parse_temperature(bad)


# exact sampler (Algorithm 1) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3, 0.6])
def test_exact_sampler_matches_tempered_distribution(temperature):
    draw_generator = torch.Generator().manual_seed(0)
    factory_generator = torch.Generator().manual_seed(1)
    draw = make_draw(draw_generator)
    num_samples = 20_000

    counts = [0] * len(PROBS_X)
    draws = []
    for _ in range(num_samples):
        sample_3, num_draws = exact_temperature_sample(draw, temperature, factory_generator)
        counts[outcome_index(sample_3)] += 1
        draws.append(num_draws)

    expected_counts = (num_samples * tempered(PROBS_X, temperature)).tolist()
    assert min(expected_counts) > 5  # chi-square approximation valid
    assert chisquare(counts, expected_counts).pvalue > 1e-3

    # Mean number of sampler calls: E[N] from §4.1, within 5 standard errors (a fraction of a percent here).
    draws_R = torch.tensor(draws, dtype=torch.float64)
    standard_error = draws_R.std().item() / math.sqrt(num_samples)
    expected = expected_draws(PROBS_X, temperature)
    assert abs(draws_R.mean().item() - expected) < 5 * standard_error
    assert abs(draws_R.mean().item() / expected - 1) < 0.03


def test_expected_draws_formula():
    # T = 1/2: n / Z_T; T = 0.6: (1 + sum_x P(x)^(2/3)) / sum_x P(x)^(5/3).
    assert expected_draws(PROBS_X, 0.5) == pytest.approx(2 / PROBS_X.pow(2).sum().item())
    expected = (1 + PROBS_X.pow(2 / 3).sum().item()) / PROBS_X.pow(5 / 3).sum().item()
    assert expected_draws(PROBS_X, 0.6) == pytest.approx(expected)
    assert expected_draws(PROBS_X, 1) == pytest.approx(1.0)


def test_exact_sampler_temperature_one_draws_once():
    calls = []

    def draw(count):
        calls.append(count)
        return OUTCOMES_X3[:count]

    sample_3, num_draws = exact_temperature_sample(draw, 1.0, torch.Generator())
    assert num_draws == 1 and calls == [1] and sample_3.tolist() == OUTCOMES_X3[0].tolist()


@pytest.mark.parametrize("temperature", [0.5, 0.6])
def test_exact_sampler_gives_up_on_flat_distribution(temperature):
    counter = iter(range(10**9))

    def all_distinct(count):
        return torch.tensor([[next(counter)] for _ in range(count)])

    with pytest.raises(RuntimeError, match=rf"T={temperature}.*max_draws=500"):
        exact_temperature_sample(all_distinct, temperature, torch.Generator().manual_seed(0), max_draws=500)


# batch approximation (Algorithm 2) ----------------------------------------------------------------------------------


def test_paper_worked_example_exact():
    letters = "ACADBEAFBG"
    candidates_N1 = torch.tensor([[ord(letter)] for letter in letters])
    weights = batch_weights(candidates_N1, n=2)
    probs = {chr(int(row)): float(p) for row, p in zip(weights.outcomes_U_, weights.probs_U)}
    assert weights.m == 2
    assert probs == {"A": 0.75, "B": 0.25, "C": 0.0, "D": 0.0, "E": 0.0, "F": 0.0, "G": 0.0}

    result = batch_temperature_sample(candidates_N1, 0.5, torch.Generator().manual_seed(0))
    assert chr(int(result.sample)) in "AB"
    assert result.fell_back_to_m == 2
    assert result.collision_rate == pytest.approx(5 / 10)  # A x3 and B x2 repeat


def test_fallback_when_no_candidate_repeats():
    candidates_N3 = torch.arange(30).view(10, 3)  # 10 distinct candidates
    weights = batch_weights(candidates_N3, n=3)
    assert weights.m == 1
    torch.testing.assert_close(weights.probs_U, torch.full((10,), 0.1, dtype=torch.float64))
    result = batch_temperature_sample(candidates_N3, "1/3", torch.Generator().manual_seed(0))
    assert result.fell_back_to_m == 1 and result.collision_rate == 0.0

    # Partial fallback: a pair but no triple gives m = 2.
    with_pair_N3 = torch.cat([candidates_N3, candidates_N3[:1]])
    assert batch_weights(with_pair_N3, n=3).m == 2


def test_batch_sampler_rejects_fractional_inverse_temperature():
    with pytest.raises(ValueError, match="exact_temperature_sample"):
        batch_temperature_sample(OUTCOMES_X3, 0.6, torch.Generator())


def compositions(total: int, parts: int):
    """All count vectors of `parts` non-negative integers summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first,) + rest


def exact_batch_output_distribution(num_candidates: int) -> torch.Tensor:
    """Algorithm 2's exact output distribution, enumerating every count vector of the N candidates."""
    output_X = torch.zeros(len(PROBS_X), dtype=torch.float64)
    for counts in compositions(num_candidates, len(PROBS_X)):
        multinomial = math.factorial(num_candidates) / math.prod(math.factorial(c) for c in counts)
        probability = multinomial * math.prod(p**c for p, c in zip(PROBS_X.tolist(), counts))
        candidates_N3 = torch.cat([OUTCOMES_X3[x].expand(c, 3) for x, c in enumerate(counts)])
        weights = batch_weights(candidates_N3, n=2)
        for outcome_3, selection in zip(weights.outcomes_U_, weights.probs_U.tolist()):
            output_X[outcome_index(outcome_3)] += probability * selection
    return output_X


def sampled_batch_output_distribution(num_candidates: int, repetitions: int, generator: torch.Generator):
    draw = make_draw(generator)
    counts_X = torch.zeros(len(PROBS_X), dtype=torch.float64)
    for _ in range(repetitions):
        counts_X[outcome_index(batch_temperature_sample(draw(num_candidates), 0.5, generator).sample)] += 1
    return counts_X / repetitions


def test_batch_approximation_converges_with_more_candidates():
    target_X = tempered(PROBS_X, 0.5)

    def total_variation(probs_X):
        return 0.5 * (probs_X - target_X).abs().sum().item()

    # N = 2: two distinct candidates fall back to a uniform pick, so the output is exactly P (i.e. T = 1).
    output_2 = exact_batch_output_distribution(2)
    torch.testing.assert_close(output_2, PROBS_X)
    output_10 = exact_batch_output_distribution(10)  # 3003 count vectors
    assert output_10.sum().item() == pytest.approx(1.0)
    assert total_variation(output_10) < total_variation(output_2) - 0.1  # about 0.036 vs 0.20

    # N = 200, by simulation through the sampler. The empirical TV overestimates the true one by at most
    # E[TV(empirical, truth)] <= sum_x sqrt(p_x / R) / 2 ~ 0.010 for R = 10k, with a spread of a few 1e-3.
    repetitions = 10_000
    tv_200 = total_variation(sampled_batch_output_distribution(200, repetitions, torch.Generator().manual_seed(2)))
    monte_carlo_bound = 0.5 * target_X.sqrt().sum().item() / math.sqrt(repetitions)
    assert tv_200 < 0.015 + monte_carlo_bound < total_variation(output_10)
