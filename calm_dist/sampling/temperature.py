"""Likelihood-free temperature sampling for CALM (CALM.md §4, §8 pitfall 14, §9.9, §9.12).

The target is P_T(x) proportional to P(x)^(1/T) where the model's distribution P can only be sampled. A candidate
x is a whole K-token chunk (one row of a LongTensor); two candidates are equal when their rows are equal.

- `exact_temperature_sample`: Algorithm 1, exact rejection sampling for any T in (0, 1].
- `batch_temperature_sample`: Algorithm 2, the reference's batch approximation for T = 1/n (biased for a
  finite candidate count N, asymptotically unbiased).

Shape legend: N candidates, K tokens per chunk, U distinct candidates, G stage-1 trials of R = n draws each,
M any number of candidates; a trailing `_` stands for the shape of one candidate ((K,) for a chunk).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, NamedTuple, Sequence

import torch

Temperature = float | int | Fraction | str
DrawCandidates = Callable[[int], torch.Tensor]

# 1/T within this relative distance of an integer counts as that integer: 1 / (1/3) = 3.0000000000000004 (§9.9).
_INTEGER_TOLERANCE = 1e-9
# Floats are converted to fractions with denominators up to this bound: T = 0.6 gives a = 2/3 exactly.
_MAX_DENOMINATOR = 10**6


def parse_temperature(temperature: Temperature) -> tuple[int, Fraction]:
    """Split 1/T into n = floor(1/T) and the fractional part a = 1/T - n, with T in (0, 1].

    Fractions and strings ("1/3", "0.5") are exact. Floats are inexact, so 1/T within a relative 1e-9 of an
    integer is that integer (T = 0.3333333333333333 gives (3, 0)), and a is rounded to the nearest fraction with
    denominator <= 1e6 (an error below 1e-12, far under the float error of T itself).
    """
    if isinstance(temperature, bool):
        raise TypeError("temperature must be a number, a Fraction or a string such as '1/3'")
    if isinstance(temperature, (str, Fraction, int)):
        exact = Fraction(temperature)
        if not 0 < exact <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        inverse = 1 / exact
        return math.floor(inverse), inverse - math.floor(inverse)

    temperature = float(temperature)
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    inverse = 1.0 / temperature
    nearest = round(inverse)
    if abs(inverse - nearest) <= _INTEGER_TOLERANCE * inverse:
        return nearest, Fraction(0)
    whole = math.floor(inverse)
    fraction = Fraction(inverse - whole).limit_denominator(_MAX_DENOMINATOR)
    if fraction == 1:  # rounding reached the next integer
        return whole + 1, Fraction(0)
    return whole, fraction


def expected_draws(probs: torch.Tensor | Sequence[float], temperature: Temperature) -> float:
    """E[number of sampler calls] of Algorithm 1 (CALM.md §4.1).

    E[N] = (n + 1{a>0} * sum_x P(x)^(1/T - 1)) / Z_T with Z_T = sum_x P(x)^(1/T); stage 1 always draws all n.
    """
    n, fraction = parse_temperature(temperature)
    inverse_temperature = n + float(fraction)
    probs_X = torch.as_tensor(probs, dtype=torch.float64)
    probs_X = probs_X[probs_X > 0]
    normaliser = probs_X.pow(inverse_temperature).sum().item()
    stage2 = probs_X.pow(inverse_temperature - 1).sum().item() if fraction > 0 else 0.0
    return (n + stage2) / normaliser


class _DrawStream:
    """Consumes i.i.d. candidate draws in order, fetching them from `draw` in blocks.

    Rejection sampling uses i.i.d. draws one after another, so drawing them in blocks is exactly equivalent.
    """

    def __init__(self, draw: DrawCandidates, block_size: int) -> None:
        self._draw = draw
        self._block_size = block_size
        self._buffer: torch.Tensor | None = None
        self._position = 0
        self.consumed = 0

    def peek(self, count: int) -> torch.Tensor:
        """The next `count` draws without consuming them (fetches more as needed)."""
        available = 0 if self._buffer is None else self._buffer.shape[0] - self._position
        if available < count:
            fresh = self._draw(max(self._block_size, count - available))
            kept = fresh if self._buffer is None else torch.cat([self._buffer[self._position :], fresh])
            self._buffer, self._position = kept, 0
        return self._buffer[self._position : self._position + count]

    def consume(self, count: int) -> None:
        self._position += count
        self.consumed += count


def _rows_equal(a_M_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
    """Whether each of the M candidates in a_M_ equals the candidate b_ (row equality), shape (M,)."""
    return (a_M_ == b_).reshape(a_M_.shape[0], -1).all(dim=1)


def exact_temperature_sample(
    draw: DrawCandidates,
    temperature: Temperature,
    generator: torch.Generator,
    max_draws: int = 100_000,
    draw_block_size: int = 64,
) -> tuple[torch.Tensor, int]:
    """Exact sample from P^(1/T)/Z given only a sampler of P (Algorithm 1, CALM.md §4.1). Returns (sample, draws).

    draw(m) returns m i.i.d. candidates, shape (m, ...) (for CALM: (m, K) decoded chunks). `generator` drives the
    Bernoulli factory's uniforms; `draw` owns its own randomness. `draws` counts the candidates consumed, whose
    expectation is `expected_draws`; candidates fetched ahead in a block and left unused are not counted.
    Stage 1 accepts x* when n draws are all equal (probability P(x*)^n); stage 2, if a = 1/T - n > 0, is Mendo's
    Bernoulli factory that succeeds with probability P(x*)^a. Raises RuntimeError when no sample is accepted
    within the first `max_draws` draws (a flat distribution, e.g. an immature model over V^K chunks).
    """
    n, fraction = parse_temperature(temperature)
    if n == 1 and fraction == 0:
        return draw(1)[0], 1  # T = 1: the model's own sample
    stage2_rate = float(fraction)
    stream = _DrawStream(draw, max(draw_block_size, n))
    trials_per_block = max(1, draw_block_size // n)

    while True:
        # Stage 1, vectorised over G trials of n consecutive draws each: the first all-equal group is accepted.
        trials_GR_ = stream.peek(trials_per_block * n)
        trials_GR_ = trials_GR_.reshape(trials_per_block, n, *trials_GR_.shape[1:])
        all_equal_G = (trials_GR_ == trials_GR_[:, :1]).reshape(trials_per_block, -1).all(dim=1)
        accepted = torch.nonzero(all_equal_G)
        if accepted.numel() == 0:
            stream.consume(trials_per_block * n)
            if stream.consumed >= max_draws:
                raise _budget_error(stream.consumed, max_draws, temperature)
            continue
        first_trial = int(accepted[0])
        candidate_ = trials_GR_[first_trial, 0].clone()
        stream.consume((first_trial + 1) * n)
        if stream.consumed > max_draws:
            raise _budget_error(stream.consumed, max_draws, temperature)
        if stage2_rate == 0.0:
            return candidate_, stream.consumed

        # Stage 2: Bernoulli factory with success probability P(candidate)^a.
        step = 1
        while True:
            draw_ = stream.peek(1)[0]
            stream.consume(1)
            if _rows_equal(draw_.unsqueeze(0), candidate_).item():
                return candidate_, stream.consumed
            if stream.consumed >= max_draws:
                raise _budget_error(stream.consumed, max_draws, temperature)
            if torch.rand((), generator=generator, dtype=torch.float64).item() < stage2_rate / step:
                break  # restart from stage 1
            step += 1


def _budget_error(consumed: int, max_draws: int, temperature: Temperature) -> RuntimeError:
    return RuntimeError(
        f"exact temperature sampling at T={temperature} accepted nothing within max_draws={max_draws} "
        f"(consumed {consumed} draws); the distribution is too flat for this T: raise T, raise max_draws, "
        "or use batch_temperature_sample"
    )


class BatchWeights(NamedTuple):
    """Distinct candidates of a batch with their counts and Algorithm 2 selection probabilities."""

    outcomes_U_: torch.Tensor
    counts_U: torch.Tensor
    probs_U: torch.Tensor  # binom(count, m) normalised, float64, exactly rounded
    m: int  # the power actually used: n, or less when no candidate occurs n times (fallback)


def batch_weights(candidates_N_: torch.Tensor, n: int) -> BatchWeights:
    """Selection probabilities of Algorithm 2 (CALM.md §4.2) for a batch of candidates and T = 1/n.

    m is the largest value <= n such that some candidate occurs at least m times; each distinct candidate x is
    chosen with probability binom(c_x, m) / sum_y binom(c_y, m). Weights are exact integers (Python ints, no
    overflow for large N) divided once, so small cases like the paper's example are reproduced exactly.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    outcomes_U_, counts_U = torch.unique(candidates_N_, dim=0, return_counts=True)
    counts = counts_U.tolist()
    m = min(n, max(counts))
    weights = [math.comb(count, m) for count in counts]
    total = sum(weights)
    probs_U = torch.tensor([weight / total for weight in weights], dtype=torch.float64)
    return BatchWeights(outcomes_U_, counts_U, probs_U, m)


class BatchSampleResult(NamedTuple):
    sample: torch.Tensor  # the chosen candidate, shape (...) of one row
    fell_back_to_m: int  # m used: n when some candidate occurs n times, else the fallback (m = 1 means T = 1)
    collision_rate: float  # fraction of candidates whose row occurs more than once in the batch


def batch_temperature_sample(
    candidates_N_: torch.Tensor, temperature: Temperature, generator: torch.Generator
) -> BatchSampleResult:
    """Approximate sample at T = 1/n from N candidates (Algorithm 2, the reference `temperature_sampling`).

    When no candidate repeats n times, m falls back towards 1, where the result is a uniformly chosen candidate,
    i.e. a sample at T = 1 (§9.12); the m used and the collision rate are reported for logging.
    `generator` must live on the CPU.
    """
    n, fraction = parse_temperature(temperature)
    if fraction != 0:
        raise ValueError(
            f"the batch sampler supports only T = 1/n; T={temperature} has 1/T = {n} + {fraction}. "
            "Use exact_temperature_sample for fractional 1/T"
        )
    weights = batch_weights(candidates_N_, n)
    chosen = int(torch.multinomial(weights.probs_U, 1, generator=generator))
    repeated_candidates = weights.counts_U[weights.counts_U > 1].sum().item()
    return BatchSampleResult(
        sample=weights.outcomes_U_[chosen],
        fell_back_to_m=weights.m,
        collision_rate=repeated_candidates / candidates_N_.shape[0],
    )
