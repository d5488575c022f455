"""BrierLM estimators against exact Brier scores (CALM.md §3, §9.1, §9.8).

Statistical checks: the estimators are unbiased, so the mean of (estimate - exact expectation) over independent
replicates (positions or starts, each with its own independent draws) must be 0 within 5 standard errors.
"""

import itertools
import math

import pytest
import torch

from calm_dist.ops.brier import (
    BrierAccumulator,
    all_starts,
    baseline_brier_terms,
    brierlm_from_means,
    calm_brier_terms,
    chunk_aligned_starts,
)

Z_BOUND = 5.0


def assert_unbiased(residuals_RN: torch.Tensor) -> None:
    """Column means of estimate - expectation are 0 within Z_BOUND standard errors (exactly 0 if no variance)."""
    mean_N = residuals_RN.mean(dim=0)
    standard_error_N = residuals_RN.std(dim=0) / math.sqrt(residuals_RN.shape[0])
    assert (mean_N.abs() <= Z_BOUND * standard_error_N + 1e-12).all(), (mean_N, standard_error_N)


def draw_tuples(probs_X: torch.Tensor, outcomes_XK: torch.Tensor, count: int, generator: torch.Generator):
    return outcomes_XK[torch.multinomial(probs_X, count, replacement=True, generator=generator)]


# (a) two-sample estimator on a categorical distribution ------------------------------------------------------------


def test_two_sample_estimator_matches_categorical_brier():
    generator = torch.Generator().manual_seed(0)
    probs_X = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    outcomes_X1 = torch.arange(5).unsqueeze(1)  # K = 1, outcome x is the token x
    observation = 1
    num_draws = 50_000
    sample1_P1 = draw_tuples(probs_X, outcomes_X1, num_draws, generator)
    sample2_P1 = draw_tuples(probs_X, outcomes_X1, num_draws, generator)
    target_P1 = torch.full((num_draws, 1), observation)

    terms_P1 = calm_brier_terms(sample1_P1, sample2_P1, target_P1, max_n=1)

    exact = 2 * probs_X[observation] - probs_X.pow(2).sum()
    assert_unbiased(terms_P1 - exact)


# (e) CALM estimator over K-tuples: exact Brier-n of the n-prefix marginals ------------------------------------------


def test_calm_estimator_matches_prefix_marginal_brier():
    torch.manual_seed(1)  # Dirichlet draw of the distribution
    generator = torch.Generator().manual_seed(1)
    vocab, chunk_size, num_positions = 3, 4, 40_000
    outcomes_XK = torch.tensor(list(itertools.product(range(vocab), repeat=chunk_size)))
    concentration = torch.full((vocab**chunk_size,), 0.3, dtype=torch.float64)
    probs_X = torch.distributions.Dirichlet(concentration).sample()  # peaked, so collisions happen at every n
    sample1_PK = draw_tuples(probs_X, outcomes_XK, num_positions, generator)
    sample2_PK = draw_tuples(probs_X, outcomes_XK, num_positions, generator)
    target_PK = outcomes_XK[torch.randint(len(outcomes_XK), (num_positions,), generator=generator)]

    terms_PN = calm_brier_terms(sample1_PK, sample2_PK, target_PK)

    probs_grid = probs_X.view((vocab,) * chunk_size)
    exact_PN = torch.empty(num_positions, chunk_size, dtype=torch.float64)
    for n in range(1, chunk_size + 1):
        trailing_dims = tuple(range(n, chunk_size))
        marginal = probs_grid.sum(dim=trailing_dims) if trailing_dims else probs_grid  # P(first n tokens)
        exact_PN[:, n - 1] = 2 * marginal[tuple(target_PK[:, :n].T)] - marginal.pow(2).sum()
    assert_unbiased(terms_PN - exact_PN)


def test_calm_estimator_values_and_chunk_size_check():
    target_PK = torch.tensor([[1, 2, 3, 4]])
    sample1_PK = torch.tensor([[1, 2, 0, 4]])  # matches y on the first 2 tokens
    sample2_PK = torch.tensor([[1, 2, 0, 5]])  # matches y on 2, matches sample 1 on 3
    terms = calm_brier_terms(sample1_PK, sample2_PK, target_PK)
    assert terms.tolist() == [[1.0, 1.0, -1.0, 0.0]]
    with pytest.raises(ValueError, match="autoregressive rollouts"):
        calm_brier_terms(target_PK[:, :2], target_PK[:, :2], target_PK[:, :2])


# (b) perfect predictors score 100 -----------------------------------------------------------------------------------


def deterministic_chain(vocab: int) -> torch.Tensor:
    """Transition matrix of the chain x -> (x + 1) mod V."""
    return torch.roll(torch.eye(vocab, dtype=torch.float64), shifts=1, dims=1)


def markov_next_token_probs(transitions_VV: torch.Tensor):
    def next_token_probs(starts_A, continuation_AJ):
        return transitions_VV[continuation_AJ[:, -1]]  # a Markov chain reads the last token only

    return next_token_probs


def test_perfect_predictor_scores_100():
    vocab, num_tokens, chunk_size = 7, 41, 4
    tokens_T = torch.arange(num_tokens) % vocab  # deterministic text
    chunks_PK = tokens_T[:40].view(-1, chunk_size)

    calm = BrierAccumulator()
    calm.update(calm_brier_terms(chunks_PK, chunks_PK.clone(), chunks_PK))
    assert calm.result()["brierlm"] == pytest.approx(100.0)

    transitions_VV = deterministic_chain(vocab)
    probs_TV = transitions_VV[tokens_T]  # one-hot teacher-forced probabilities
    baseline = BrierAccumulator()
    terms_SN = baseline_brier_terms(
        probs_TV, tokens_T, markov_next_token_probs(transitions_VV), torch.Generator().manual_seed(0)
    )
    baseline.update(terms_SN)
    result = baseline.result()
    assert terms_SN.shape == (num_tokens - 4, 4)
    assert [result[f"brier{n}"] for n in range(1, 5)] == [1.0, 1.0, 1.0, 1.0]
    assert result["brierlm"] == pytest.approx(100.0)


# (c) per-n clamp ----------------------------------------------------------------------------------------------------


def test_per_n_clamp_gives_zero_for_identical_wrong_samples():
    # Zero-initialised head: both samples identical but wrong, every pair collides: Brier-n = -1 for all n.
    target_PK = torch.zeros(10, 4, dtype=torch.long)
    wrong_PK = torch.ones(10, 4, dtype=torch.long)
    accumulator = BrierAccumulator()
    accumulator.update(calm_brier_terms(wrong_PK, wrong_PK, target_PK))
    result = accumulator.result()

    assert [result[f"brier{n}"] for n in range(1, 5)] == [-1.0, -1.0, -1.0, -1.0]  # raw values reported
    assert result["brierlm"] == 0.0
    reference_product_clamp = 100 * max(math.prod([-1.0] * 4), 0.0) ** 0.25
    assert reference_product_clamp == 100.0  # what the reference would report
    assert brierlm_from_means([0.5, -0.1, -0.2, 0.3]) == 0.0
    assert brierlm_from_means([0.5, 0.4, 0.2, 0.1]) == pytest.approx(100 * (0.5 * 0.4 * 0.2 * 0.1) ** 0.25)


# (d) baseline estimator on a known Markov chain ---------------------------------------------------------------------


def exact_markov_brier(transitions_VV: torch.Tensor, tokens_T: torch.Tensor, starts_S: torch.Tensor, max_n: int):
    """Exact Brier-n per start: 2 P(y_1..n | y_0) - sum over n-grams of P(n-gram | y_0)^2."""
    vocab = transitions_VV.shape[0]
    squared_VV = transitions_VV.pow(2)
    exact_SN = torch.empty(starts_S.shape[0], max_n, dtype=torch.float64)
    collision_power_V = torch.ones(vocab, dtype=torch.float64)
    for n in range(1, max_n + 1):
        collision_power_V = squared_VV @ collision_power_V  # sum over n-grams of prod A^2 = (A∘A)^n 1
        steps = [transitions_VV[tokens_T[starts_S + j], tokens_T[starts_S + j + 1]] for j in range(n)]
        exact_SN[:, n - 1] = 2 * torch.stack(steps).prod(dim=0) - collision_power_V[tokens_T[starts_S]]
    return exact_SN


def test_exact_markov_collision_matches_enumeration():
    torch.manual_seed(5)
    transitions_VV = torch.distributions.Dirichlet(torch.ones(3, 3, dtype=torch.float64)).sample()
    tokens_T = torch.tensor([0, 1, 2, 0, 1])
    exact = exact_markov_brier(transitions_VV, tokens_T, torch.tensor([0]), max_n=3)
    for n in range(1, 4):
        collision = sum(
            math.prod(transitions_VV[a, b].item() ** 2 for a, b in zip((0,) + ngram, ngram))
            for ngram in itertools.product(range(3), repeat=n)
        )
        accuracy = math.prod(transitions_VV[a, b].item() for a, b in zip([0, 1, 2], [1, 2, 0][:n]))
        assert exact[0, n - 1].item() == pytest.approx(2 * accuracy - collision, rel=1e-12)


def sample_markov_chain(transitions_VV: torch.Tensor, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    cumulative_VV = transitions_VV.cumsum(dim=1).tolist()
    uniforms = torch.rand(num_tokens, generator=generator, dtype=torch.float64).tolist()
    tokens = [0]
    for uniform in uniforms[1:]:
        row = cumulative_VV[tokens[-1]]
        tokens.append(min(sum(uniform >= edge for edge in row), len(row) - 1))
    return torch.tensor(tokens)


def test_baseline_estimator_unbiased_on_markov_chain():
    torch.manual_seed(2)  # Dirichlet draw of the chain
    generator = torch.Generator().manual_seed(3)
    vocab, num_blocks, block_tokens, max_n = 4, 100, 201, 4
    transitions_VV = torch.distributions.Dirichlet(torch.full((vocab, vocab), 0.5, dtype=torch.float64)).sample()
    blocks_BT = sample_markov_chain(transitions_VV, num_blocks * block_tokens, generator).view(num_blocks, -1)
    starts_S = all_starts(block_tokens, max_n)

    residuals, rows_queried = [], []

    def next_token_probs(starts_A, continuation_AJ):
        rows_queried.append(len(starts_A))
        assert continuation_AJ.shape == (len(starts_A), len(rows_queried))  # the j-th call continues j tokens
        return markov_next_token_probs(transitions_VV)(starts_A, continuation_AJ)

    for tokens_T in blocks_BT:  # every block uses fresh draws from the same generator
        probs_TV = transitions_VV[tokens_T]
        terms_SN = baseline_brier_terms(probs_TV, tokens_T, next_token_probs, generator, max_n=max_n)
        residuals.append(terms_SN - exact_markov_brier(transitions_VV, tokens_T, starts_S, max_n))
        assert len(rows_queried) <= max_n - 1  # only undiverged starts are continued, never an empty query
        assert rows_queried[0] < len(starts_S) and all(a >= b > 0 for a, b in zip(rows_queried, rows_queried[1:]))
        rows_queried.clear()

    residuals_SN = torch.cat(residuals)
    assert residuals_SN[:, 0].abs().max() < 1e-12  # Brier-1 is exact: no sampling involved
    assert_unbiased(residuals_SN)


def test_start_helpers():
    assert all_starts(13, 4).tolist() == list(range(9))  # tokens[i+1 : i+5] must exist
    # n-grams begin at token indices 4 and 8 (multiples of K, t + 4 <= 13), i.e. starts t - 1.
    assert chunk_aligned_starts(13, 4, 4).tolist() == [3, 7]
    assert chunk_aligned_starts(12, 4, 4).tolist() == [3, 7]
    assert chunk_aligned_starts(11, 4, 4).tolist() == [3]


def test_baseline_aligned_starts_and_validation():
    vocab = 5
    transitions_VV = deterministic_chain(vocab)
    tokens_T = torch.arange(21) % vocab
    probs_TV = transitions_VV[tokens_T]
    starts = chunk_aligned_starts(21, 4)
    terms_SN = baseline_brier_terms(
        probs_TV, tokens_T, markov_next_token_probs(transitions_VV), torch.Generator(), starts=starts
    )
    assert terms_SN.shape == (len(starts), 4)
    with pytest.raises(ValueError, match="starts must lie"):
        baseline_brier_terms(
            probs_TV, tokens_T, markov_next_token_probs(transitions_VV), torch.Generator(), starts=[17]
        )


# accumulator --------------------------------------------------------------------------------------------------------


def test_accumulator_merge_and_state_roundtrip():
    generator = torch.Generator().manual_seed(4)
    blocks = [torch.randn(size, 4, generator=generator, dtype=torch.float64) for size in (5, 5, 5)]
    combined = BrierAccumulator()
    for block in blocks:
        combined.update(block)
    first, second = BrierAccumulator(), BrierAccumulator()
    first.update(blocks[0])
    second.update(blocks[1])
    second.update(blocks[2])

    merged = BrierAccumulator.from_state(first.state() + second.state())  # what all_reduce(SUM) gives
    first.merge(second)
    for result in (merged.result(), first.result()):
        assert result["positions"] == 15 and result["blocks"] == 3
        for n in range(1, 5):
            assert result[f"brier{n}"] == pytest.approx(combined.result()[f"brier{n}"], rel=1e-12)
    # Equal-sized blocks: the global mean equals the reference's mean of per-block means.
    per_block = torch.stack([block.mean(dim=0) for block in blocks]).mean(dim=0)
    assert combined.result()["brier1"] == pytest.approx(per_block[0].item(), rel=1e-12)
    # The standard error across blocks: the sample standard deviation of the block means / sqrt(blocks),
    # the same from the merged sums as from one accumulator.
    block_means = torch.stack([block.mean(dim=0) for block in blocks])
    expected = (block_means.std(dim=0, unbiased=True) / len(blocks) ** 0.5).tolist()
    for accumulator in (combined, merged, first):
        assert accumulator.stderr() == pytest.approx(expected, rel=1e-9)
    assert BrierAccumulator().stderr() == [None] * 4
    with pytest.raises(ValueError, match="no positions"):
        BrierAccumulator().result()
