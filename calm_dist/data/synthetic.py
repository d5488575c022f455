"""Synthetic sources with a known next-chunk law: check that a setup learns before spending GPU-days.

The law is a token-level first-order Markov chain over V content tokens, so the law of every
K-token chunk depends only on the last token before it, whatever the chunk alignment of a document
inside the packed stream (training packs BOS + doc back to back, evaluation BOS + doc + EOS).

  det     next = perm1[prev]: a fixed random permutation; deterministic, optimal BrierLM 100
  markov  next = perm1[prev] with probability 1 - q, perm2[prev] with probability q, where
          perm2[s] != perm1[s] for every s. Both are permutations, so the transition matrix is
          doubly stochastic and the stationary law is uniform.

Documents have a fixed length; their first token is uniform (the stationary law), so a document
is a stationary stretch of the chain.

Closed forms (P the transition matrix, pi the stationary law, o the elementwise product): the best
expected Brier-n of an n-gram after a known previous token is pi^T (P o P)^n 1, because the
expected Brier score of the true law is sum_y P(y)^2. For markov every row of P o P sums to
c = (1-q)^2 + q^2, so Brier-n = c^n (0.82^n for q = 0.1) and BrierLM = 100 c^2.5 (60.89); det gives
1 and 100. A predictor that ignores all context and predicts each token from pi scores
(sum_x pi(x)^2)^n = V^-n; one that knows the n-gram law but not the token before it (a model that
learned only the chunk marginal) scores (pi o pi)^T (P o P)^(n-1) 1 = c^(n-1) / V.

Not covered by the law: in evaluation packing each document adds EOS, BOS and a uniform first
token, three consecutive positions per doc_tokens + 2. An n-gram start touches them at n + 2 of
those positions; CALM scores only chunk-aligned starts (every K-th), at most ceil((n + 2) / K) of
them. `boundary_fraction` bounds that share: K ceil((max_n + 2) / K) / (doc_tokens + 2), 0.195%
for 4096-token documents and K = max_n = 4. Every position's optimal expected Brier lies in
[0, 1], so the optimum measured on evaluation blocks is within that fraction of the closed form
(`optimal_brier_range`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from calm_dist.ops.brier import brierlm_from_means
from calm_dist.ops.energy import energy_loss

SOURCES = ("det", "markov")
DEFAULT_VOCAB = 64
DEFAULT_Q = 0.1
DEFAULT_DOC_TOKENS = 4096
DEFAULT_TRAIN_TOKENS = 400_000  # valid: a tenth; small enough for CPU checks

# (B, C, K) token ids -> (mu, log_sigma), each (B, C, L): what Autoencoder.encode does.
Encode = Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]  # noqa: F821


@dataclass(frozen=True)
class SyntheticSource:
    """One chain: its kind, V content tokens (ids 0..V-1), q, and the two successor permutations."""

    kind: str
    vocab: int
    q: float  # probability of the perm2 successor; 0 for det
    seed: int
    perm1: np.ndarray
    perm2: np.ndarray  # equal to perm1 for det (never used there)

    def params(self) -> dict:
        """JSON-ready description of the law, enough to rebuild it with make_source."""
        return {"source": self.kind, "vocab": self.vocab, "q": self.q, "seed": self.seed,
                "perm1": self.perm1.tolist(), "perm2": self.perm2.tolist()}


def make_source(kind: str, vocab: int = DEFAULT_VOCAB, q: float = DEFAULT_Q, seed: int = 0) -> SyntheticSource:
    """The chain `kind` ('det' or 'markov') over `vocab` tokens; the permutations come from `seed`."""
    if kind not in SOURCES:
        raise ValueError(f"unknown synthetic source {kind!r} (--synthetic): choose one of {', '.join(SOURCES)}")
    if vocab < 2:
        raise ValueError(f"a synthetic source needs vocab >= 2 content tokens (--vocab-size), got {vocab}")
    if kind == "markov" and not 0.0 < q < 1.0:
        raise ValueError(f"markov q (--synthetic-q) must lie strictly between 0 and 1, got {q}")
    if seed < 0:
        raise ValueError(f"the seed (--seed) must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0])
    # perm1 is ONE cycle through all V tokens: every document visits every token, so the chain is
    # irreducible (its uniform stationary law is the only one) and any split covers every chunk.
    # A plain random permutation splits into short cycles: a document stuck in a fixed point
    # repeats one token forever and may be the only one to visit it.
    order = rng.permutation(vocab)
    perm1 = np.empty(vocab, dtype=np.int64)
    perm1[order] = np.roll(order, -1)
    if kind == "det":
        return SyntheticSource(kind, vocab, 0.0, seed, perm1, perm1)
    shift = rng.permutation(vocab)
    while np.any(shift == np.arange(vocab)):  # a derangement: about e tries
        shift = rng.permutation(vocab)
    return SyntheticSource(kind, vocab, float(q), seed, perm1, perm1[shift])  # perm1 injective: differs everywhere


def continue_chain(source: SyntheticSource, last: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """`steps` more tokens after each token of `last` (shape (P,)), drawn from the law: (P, steps)."""
    out = np.empty((len(last), steps), dtype=np.int64)
    previous = np.asarray(last, dtype=np.int64)
    for t in range(steps):
        following = source.perm1[previous]
        if source.kind == "markov":
            following = np.where(rng.random(len(previous)) < source.q, source.perm2[previous], following)
        out[:, t] = previous = following
    return out


def sample_documents(source: SyntheticSource, count: int, doc_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """`count` documents of `doc_tokens` tokens, first token uniform: (count, doc_tokens) int64."""
    first = rng.integers(0, source.vocab, size=count)
    return np.concatenate([first[:, None], continue_chain(source, first, doc_tokens - 1, rng)], axis=1)


# closed forms -------------------------------------------------------------------------------


def transition_matrix(source: SyntheticSource) -> np.ndarray:
    """P[s, t] = probability of t after s."""
    rows = np.arange(source.vocab)
    matrix = np.zeros((source.vocab, source.vocab))
    matrix[rows, source.perm1] += 1.0 - source.q
    matrix[rows, source.perm2] += source.q
    return matrix


def _stationary(source: SyntheticSource) -> np.ndarray:
    return np.full(source.vocab, 1.0 / source.vocab)  # permutation mixtures are doubly stochastic


def _collision_sums(start: np.ndarray, source: SyntheticSource, orders: int) -> list[float]:
    """start^T (P o P)^n 1 for n = 1..orders."""
    squared, vector, out = transition_matrix(source) ** 2, np.ones(source.vocab), []
    for _ in range(orders):
        vector = squared @ vector
        out.append(float(start @ vector))
    return out


def optimal_brier(source: SyntheticSource, max_n: int = 4) -> list[float]:
    """Best expected Brier-1..max_n with the previous token known: pi^T (P o P)^n 1."""
    return _collision_sums(_stationary(source), source, max_n)


def optimal_brierlm(source: SyntheticSource, max_n: int = 4) -> float:
    return brierlm_from_means(optimal_brier(source, max_n))


def unconditional_brier(source: SyntheticSource, max_n: int = 4) -> list[float]:
    """Brier-n of predicting every token from pi, ignoring all context: (sum_x pi(x)^2)^n."""
    per_token = float(np.sum(_stationary(source) ** 2))
    return [per_token ** n for n in range(1, max_n + 1)]


def chunk_marginal_brier(source: SyntheticSource, max_n: int = 4) -> list[float]:
    """Brier-n of the true n-gram law without the token before it: (pi o pi)^T (P o P)^(n-1) 1."""
    pi = _stationary(source)
    return [float(np.sum(pi ** 2))] + _collision_sums(pi ** 2, source, max_n - 1)


def boundary_fraction(doc_tokens: int, max_n: int = 4, chunk_size: int = 4) -> float:
    """Upper bound on the share of scored n-gram starts (every start, or every K-th) that touch
    a document's EOS, BOS or first token in evaluation packing; see the module docstring."""
    return chunk_size * math.ceil((max_n + 2) / chunk_size) / (doc_tokens + 2)


def optimal_brier_range(source: SyntheticSource, doc_tokens: int, max_n: int = 4,
                        chunk_size: int = 4) -> dict[str, list[float]]:
    """Where the optimal Brier-n and BrierLM measured on evaluation blocks lie: the closed form
    with a boundary_fraction of positions at any optimal value in [0, 1]."""
    share = boundary_fraction(doc_tokens, max_n, chunk_size)
    low = [(1 - share) * b for b in optimal_brier(source, max_n)]
    high = [(1 - share) * b + share for b in optimal_brier(source, max_n)]
    return {"brier": [[lo, hi] for lo, hi in zip(low, high)],
            "brierlm": [brierlm_from_means(low), brierlm_from_means(high)]}


# the oracle's energy loss (Monte Carlo) -------------------------------------------------------


def oracle_energy_loss(source: SyntheticSource, encode: Encode, *, chunk_size: int = 4, positions: int = 512,
                       num_samples: int = 16, num_targets: int = 16, beta: float = 1.0, seed: int = 0) -> float:
    """Expected energy loss of the optimal next-chunk predictor, estimated by Monte Carlo.

    For `positions` previous tokens s ~ pi: the true chunk c ~ law(. | s); the oracle's samples are
    X = mu_c' + sigma_c' * eps with c' ~ law(. | s) (the mixture of the successor chunks' posterior
    Gaussians with their probabilities); targets are Y = mu_c + sigma_c * eps, the posterior of the
    true chunk. `energy_loss` then estimates 2 E||X - Y||^beta - E||X - X'||^beta without bias.
    Monte Carlo over exact Gaussians, not a closed form: the expected norm of an anisotropic
    Gaussian has no elementary form. `encode` is e.g. `Autoencoder.encode` (on CPU inputs; wrap
    it to move them to a device). Fixed generators: the same arguments give the same number.
    """
    rng = np.random.default_rng([seed, 3])
    previous = rng.integers(0, source.vocab, size=positions)
    drawn = continue_chain(source, np.tile(previous, 1 + num_samples), chunk_size, rng)
    chunks = torch.from_numpy(drawn).reshape(1 + num_samples, positions, chunk_size)  # row 0: the truth
    with torch.no_grad():
        mu, log_sigma = encode(chunks)
    mu, sigma = mu.float().cpu(), log_sigma.float().exp().cpu()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples + num_targets, *mu.shape[1:]), generator=generator)
    samples_NPL = mu[1:] + sigma[1:] * noise[:num_samples]
    targets_MPL = mu[0] + sigma[0] * noise[num_samples:]
    return energy_loss(samples_NPL, targets_MPL, beta=beta).loss.item()
