"""BrierLM: likelihood-free Brier-n estimators and their accumulation (CALM.md §3, §8 pitfall 12, §9.1, §9.8).

Brier(P, y) = 2 P(y) - sum_x P(x)^2 for an n-gram y treated as one outcome, conditioned on the true prefix.
BrierLM = 100 * (prod_n max(Brier-n, 0))^(1/max_n) over n = 1..max_n (max_n = 4).

Shape legend: P scored chunk positions, K tokens per chunk, T tokens in a block, V vocabulary, S scored starts,
N n-gram orders (max_n).
"""

from __future__ import annotations

import math
from typing import Callable, Generator, Sequence

import torch

# (starts_A, continuation_AJ) -> (A, V): the next-token distribution after tokens[: start + 1] followed by
# the row's J sampled tokens, for every row.
NextTokenProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (blocks_A, starts_A, continuation_AJ) -> (A, V): the same for rows of several blocks, row a continuing block
# blocks_A[a].
BlocksNextTokenProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def brierlm_from_means(brier_means: Sequence[float]) -> float:
    """100 * geometric mean of the Brier-n means, each clamped at 0 first (deliberate deviation, CALM.md §9.1).

    The reference clamps only the product, so an even number of negative Brier-n scores positively: an untrained
    CALM with Brier-n = -1 for all n would get 100 * ((-1)^4)^(1/4) = 100. Clamping each factor gives 0.
    """
    product = math.prod(max(float(mean), 0.0) for mean in brier_means)
    return 100.0 * product ** (1.0 / len(brier_means))


class BrierAccumulator:
    """Running sums of Brier-1..max_n terms over evaluation blocks, reducible across ranks.

    `result()` reports the *global* mean over all scored positions. The reference instead averages per-block means;
    the two coincide whenever every block scores the same number of positions, which our evaluation protocol
    guarantees (fixed-size blocks, remainder dropped, same start rule in every block; CALM.md §9.7). The block
    means' sums and squares give the standard error of each Brier-n across blocks.
    """

    def __init__(self, max_n: int = 4) -> None:
        self.max_n = max_n
        self.sums_N = torch.zeros(max_n, dtype=torch.float64)
        self.block_sums_N = torch.zeros(max_n, dtype=torch.float64)  # sum over blocks of the block's mean
        self.block_squares_N = torch.zeros(max_n, dtype=torch.float64)  # ... and of its square
        self.positions = 0
        self.blocks = 0

    def update(self, terms_SN: torch.Tensor) -> None:
        """Add one block's per-position Brier-n terms, shape (S, max_n)."""
        if terms_SN.dim() != 2 or terms_SN.shape[1] != self.max_n:
            raise ValueError(f"expected terms of shape (S, {self.max_n}), got {tuple(terms_SN.shape)}")
        terms_SN = terms_SN.detach().to(device="cpu", dtype=torch.float64)
        self.sums_N += terms_SN.sum(dim=0)
        if terms_SN.shape[0]:
            block_mean_N = terms_SN.mean(dim=0)
            self.block_sums_N += block_mean_N
            self.block_squares_N += block_mean_N.square()
        self.positions += terms_SN.shape[0]
        self.blocks += 1

    def _fields(self) -> list[torch.Tensor]:
        return [self.sums_N, self.block_sums_N, self.block_squares_N]

    def merge(self, other: BrierAccumulator) -> BrierAccumulator:
        """Add another accumulator's counts into this one (e.g. gathered from another rank); returns self."""
        if other.max_n != self.max_n:
            raise ValueError(f"cannot merge max_n={other.max_n} into max_n={self.max_n}")
        for mine, theirs in zip(self._fields(), other._fields()):
            mine += theirs
        self.positions += other.positions
        self.blocks += other.blocks
        return self

    def state(self) -> torch.Tensor:
        """Flat float64 tensor [sums, block sums, block squares (max_n each), positions, blocks]; all_reduce(SUM)
        it, then `from_state`."""
        counts = torch.tensor([self.positions, self.blocks], dtype=torch.float64)
        return torch.cat([*self._fields(), counts])

    @classmethod
    def from_state(cls, state: torch.Tensor) -> BrierAccumulator:
        state = state.detach().to(device="cpu", dtype=torch.float64)
        max_n = (state.numel() - 2) // 3
        accumulator = cls(max_n=max_n)
        accumulator.sums_N, accumulator.block_sums_N, accumulator.block_squares_N = (
            state[i * max_n : (i + 1) * max_n].clone() for i in range(3))
        accumulator.positions = int(state[-2].item())
        accumulator.blocks = int(state[-1].item())
        return accumulator

    def stderr(self) -> list[float | None]:
        """Standard error of each Brier-n's block mean across blocks (None below 2 blocks)."""
        if self.blocks < 2:
            return [None] * self.max_n
        mean_N = self.block_sums_N / self.blocks
        variance_N = (self.block_squares_N / self.blocks - mean_N.square()).clamp(min=0) * self.blocks / (self.blocks - 1)
        return (variance_N / self.blocks).sqrt().tolist()

    def result(self) -> dict[str, float | int]:
        """Raw (unclamped) brier1..brierN means, brierlm (per-n clamp, x100), positions and blocks scored."""
        if self.positions == 0:
            raise ValueError("no positions scored yet")
        means = (self.sums_N / self.positions).tolist()
        result: dict[str, float | int] = {f"brier{n + 1}": mean for n, mean in enumerate(means)}
        result["brierlm"] = brierlm_from_means(means)
        result["positions"] = self.positions
        result["blocks"] = self.blocks
        return result


def calm_brier_terms(
    sample1_PK: torch.Tensor, sample2_PK: torch.Tensor, target_PK: torch.Tensor, max_n: int = 4
) -> torch.Tensor:
    """CALM two-sample Brier-n terms per chunk position, shape (P, max_n), float64 (CALM.md §3.2).

    For n <= K: 1{x1[:n] = y[:n]} + 1{x2[:n] = y[:n]} - 1{x1[:n] = x2[:n]}, where x1, x2 are two independent
    decoded head samples and y the true chunk. n-grams are chunk-aligned: only the first n tokens of each chunk.
    """
    chunk_size = target_PK.shape[-1]
    if chunk_size < max_n:
        raise ValueError(
            f"chunk size K={chunk_size} < max_n={max_n}: Brier-n for n > K needs autoregressive rollouts "
            "along sample 1's path (CALM.md §3.2), which are not implemented yet"
        )
    if not sample1_PK.shape == sample2_PK.shape == target_PK.shape:
        raise ValueError(
            f"shape mismatch: {tuple(sample1_PK.shape)}, {tuple(sample2_PK.shape)}, {tuple(target_PK.shape)}"
        )

    def prefix_equal_PN(a_PK: torch.Tensor, b_PK: torch.Tensor) -> torch.Tensor:
        return (a_PK[:, :max_n] == b_PK[:, :max_n]).to(torch.float64).cumprod(dim=1)

    return (
        prefix_equal_PN(sample1_PK, target_PK)
        + prefix_equal_PN(sample2_PK, target_PK)
        - prefix_equal_PN(sample1_PK, sample2_PK)
    )


def all_starts(num_tokens: int, max_n: int = 4) -> torch.Tensor:
    """Every start i whose n-gram tokens[i+1 : i+1+max_n] lies in the block: i = 0 .. T-1-max_n (§9.8)."""
    return torch.arange(max(num_tokens - max_n, 0))


def chunk_aligned_starts(num_tokens: int, chunk_size: int, max_n: int = 4) -> torch.Tensor:
    """Starts whose n-gram begins at a token index t = i+1 that is a multiple of K, like CALM's targets (§9.8).

    Token 0 begins the block and has no context, so the first aligned n-gram starts at t = K (the first target
    chunk of a CALM block); t + max_n <= T keeps the whole n-gram inside the block.
    """
    first_tokens = torch.arange(chunk_size, num_tokens - max_n + 1, chunk_size)
    return first_tokens - 1


def baseline_brier_terms(
    probs_TV: torch.Tensor,
    tokens_T: torch.Tensor,
    next_token_probs: NextTokenProbs,
    generator: torch.Generator,
    max_n: int = 4,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-baseline Brier-n terms per start, shape (S, max_n), float64 (CALM.md §3.3).

    probs_TV[i] is the teacher-forced next-token distribution after tokens[:i+1] (it predicts tokens[i+1]).
    A start i scores the n-gram y = tokens[i+1 : i+1+n]:
      term_n = 2 * prod_{j<=n} P(y_j | tokens[:i+1], y_<j)   (exact, teacher forced)
               - coll_n,   coll_n = same_{n-1} * sum_x p_n(x)^2
    where two continuations s1, s2 are sampled step by step, p_n is the next-token distribution after the context
    followed by s1[:n-1], and same_{n-1} = 1{s1[:n-1] = s2[:n-1]}. coll_n is the Rao-Blackwellised (conditional
    expectation of the) collision indicator 1{s1[:n] = s2[:n]}, so it is an unbiased estimate of sum over
    n-grams of P^2. Rows whose samples have diverged contribute 0 from then on and are never queried again.

    next_token_probs(starts_A, continuation_AJ) returns (A, V) next-token distributions after each undiverged
    start's context followed by its sampled continuation; its j-th call has J = j, and it is called only while
    some start is still undiverged, at most max_n - 1 times. `generator` must live on the
    device of `probs_TV`. `starts` defaults to `all_starts`; pass `chunk_aligned_starts` for the aligned variant.
    """
    rollout = _brier_rollout(probs_TV, tokens_T, generator, max_n, starts)
    return _drive([rollout], lambda blocks_A, starts_A, continuation_AJ: next_token_probs(starts_A, continuation_AJ))[0]


def baseline_brier_terms_blocks(
    probs_BTV: torch.Tensor,
    tokens_BT: torch.Tensor,
    next_token_probs: BlocksNextTokenProbs,
    generators: Sequence[torch.Generator],
    max_n: int = 4,
) -> list[torch.Tensor]:
    """`baseline_brier_terms` of several blocks at once (every start of each), block b drawing from
    `generators[b]`: the same terms as block by block, but each rollout step of all the blocks is one
    `next_token_probs(blocks_A, starts_A, continuation_AJ)` call, row a continuing block blocks_A[a].
    The blocks' j-th requests all have J = j, so they concatenate."""
    if not probs_BTV.shape[0] == tokens_BT.shape[0] == len(generators):
        raise ValueError(f"{probs_BTV.shape[0]} blocks of probabilities, {tokens_BT.shape[0]} of tokens, "
                         f"{len(generators)} generators")
    return _drive([_brier_rollout(probs_TV, tokens_T, generator, max_n, None)
                   for probs_TV, tokens_T, generator in zip(probs_BTV, tokens_BT, generators)], next_token_probs)


# A block's rollout: yields (starts_A, continuation_AJ) requests, is sent their (A, V) probabilities,
# and returns the block's (S, max_n) terms.
Rollout = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


def _drive(rollouts: list[Rollout], next_token_probs: BlocksNextTokenProbs) -> list[torch.Tensor]:
    """Run the blocks' rollouts side by side, one `next_token_probs` call per step for all of them."""
    terms: list[torch.Tensor | None] = [None] * len(rollouts)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def advance(block: int, probs_AV: torch.Tensor | None) -> None:
        try:
            pending[block] = rollouts[block].send(probs_AV)
        except StopIteration as done:
            terms[block] = done.value

    for block in range(len(rollouts)):
        advance(block, None)
    while pending:
        order = sorted(pending)
        requests = [pending.pop(block) for block in order]
        starts_A = torch.cat([starts for starts, _ in requests])
        continuation_AJ = torch.cat([continuation for _, continuation in requests])  # same J: same step
        blocks_A = torch.cat([torch.full_like(starts, block) for block, (starts, _) in zip(order, requests)])
        probs_AV = next_token_probs(blocks_A, starts_A, continuation_AJ)
        for block, probs in zip(order, probs_AV.split([starts.shape[0] for starts, _ in requests])):
            advance(block, probs)
    return terms


def _brier_rollout(probs_TV: torch.Tensor, tokens_T: torch.Tensor, generator: torch.Generator, max_n: int,
                   starts: torch.Tensor | None) -> Rollout:
    """One block's `baseline_brier_terms`, asking for each step's rollout probabilities by `yield`."""
    num_tokens = tokens_T.shape[0]
    starts_S = all_starts(num_tokens, max_n) if starts is None else torch.as_tensor(starts, dtype=torch.long)
    if starts_S.numel() and (starts_S.min() < 0 or starts_S.max() > num_tokens - 1 - max_n):
        raise ValueError(f"starts must lie in [0, {num_tokens - 1 - max_n}] so that every n-gram fits the block")
    if probs_TV.shape[0] < num_tokens - 1:
        raise ValueError(f"need teacher-forced probabilities for at least T-1={num_tokens - 1} positions")
    device = probs_TV.device
    if starts_S.numel() == 0:
        return torch.zeros((0, max_n), dtype=torch.float64, device=device)
    starts_S = starts_S.to(device)
    tokens_T = tokens_T.to(device)

    # Accuracy: exact teacher-forced n-gram probabilities.
    steps_N = torch.arange(max_n, device=device)
    rows_SN = starts_S[:, None] + steps_N  # probs row predicting the j-th n-gram token
    true_probs_SN = probs_TV[rows_SN, tokens_T[rows_SN + 1]].to(torch.float64)
    accuracy_SN = true_probs_SN.cumprod(dim=1)

    collision_SN = torch.zeros_like(accuracy_SN)
    active_A = torch.arange(starts_S.shape[0], device=device)  # indices of undiverged starts
    continuation_AJ = tokens_T.new_zeros((starts_S.shape[0], 0))  # s1 tokens sampled so far
    step_probs_AV = probs_TV[starts_S].to(torch.float64)
    for step in range(max_n):
        collision_SN[active_A, step] = step_probs_AV.pow(2).sum(dim=-1)
        if step == max_n - 1:
            break  # the last step's draws would only decide collisions beyond max_n
        draws_A2 = torch.multinomial(step_probs_AV, 2, replacement=True, generator=generator)
        still_same_A = draws_A2[:, 0] == draws_A2[:, 1]
        active_A = active_A[still_same_A]
        if active_A.numel() == 0:
            break  # every start has diverged: all later collision terms are 0
        continuation_AJ = torch.cat([continuation_AJ[still_same_A], draws_A2[still_same_A, :1]], dim=1)
        request = starts_S[active_A], continuation_AJ
        step_probs_AV = None  # (S, V) at the first step: not held while the other blocks take theirs
        step_probs_AV = (yield request).to(device=device, dtype=torch.float64)

    return 2.0 * accuracy_SN - collision_SN
