"""Epoch planning: which shards each data stream reads, and how many batches every stream yields.

A rank reads through `num_workers` streams (one per DataLoader worker, at least one), so there are
S = world_size x workers streams in all; stream g = rank + worker x world_size, which is
webdataset's split_by_node followed by split_by_worker. Everything here is a pure function of
(seed, epoch, layout), so every rank computes the same plan without talking to the others.

exact     each epoch shuffles the shard list (seeded by seed and epoch, like webdataset's
          detshuffle) and deals it to the streams: shards are disjoint across ranks and workers and
          each is read once per epoch. The last n mod S shards of the shuffled list sit the epoch out
          (a different few each epoch), so streams get equal shard counts.
resampled each stream draws shards with replacement (seeded by seed, epoch and stream), weighted by
          size and, across several shard directories, by the given source weights; any shard count
          works. This is the webdataset maintainers' recommendation for endless streams.

Every stream yields the same number of batches per epoch, the smallest any stream can fill (a
lower bound from the index: packing adds at least 1 or 2 tokens per document), so all ranks run
the same number of steps and collectives never wait on a rank that ran dry.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from calm_dist.data.index import ShardIndex

_DRAW_CHUNK = 256  # resampled draws are made in fixed-size chunks so any prefix is reproducible


class EpochPlanner:
    def __init__(self, indexes: Sequence[ShardIndex], world_size: int, workers: int, seed: int,
                 block_tokens: int, micro_batch_size: int, extra_tokens_per_doc: int,
                 resampled: bool = False, weights: Sequence[float] | None = None, shuffle: bool = True):
        self.indexes = list(indexes)
        self.world_size, self.workers, self.seed = world_size, workers, seed
        self.streams = world_size * workers
        self.block_tokens, self.micro_batch_size = block_tokens, micro_batch_size
        self.resampled, self.shuffle = resampled, shuffle
        # (index number, shard number) for every shard of every source, and its guaranteed tokens
        self.shards = [(i, j) for i, index in enumerate(self.indexes) for j in range(len(index.shards))]
        self.min_tokens = np.array([self.indexes[i].shards[j].tokens + extra_tokens_per_doc
                                    * self.indexes[i].shards[j].docs for i, j in self.shards], dtype=np.int64)
        if weights is not None and not resampled:
            raise ValueError("source weights need resampled mode (exact mode reads every shard once "
                             "per epoch, so sources mix in proportion to their size)")
        self.probabilities = self._draw_probabilities(weights) if resampled else None
        if not resampled and len(self.shards) < self.streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot be dealt to {self.streams} streams (world_size "
                f"{world_size} x {workers} workers): prepare smaller shards (--shard-tokens), use fewer "
                "workers, or use resampled mode"
            )
        self._check_any_epoch_fills_a_batch()

    def _check_any_epoch_fills_a_batch(self) -> None:
        """Fail at construction, not hours into a run: even a stream dealt the smallest shards (exact
        mode) must fill one batch."""
        if self.resampled:
            worst = int(self.min_tokens.sum()) // self.streams
        else:
            worst = int(np.sort(self.min_tokens)[:len(self.shards) // self.streams].sum())
        if worst // self.block_tokens // self.micro_batch_size < 1:
            raise ValueError(
                f"too little data: a stream could get {worst} tokens, less than one batch of "
                f"{self.micro_batch_size} x {self.block_tokens} tokens ({len(self.shards)} shards over "
                f"{self.streams} streams); use more data, fewer workers or smaller batches"
            )

    def stream_id(self, rank: int, worker: int) -> int:
        return rank + worker * self.world_size

    def _draw_probabilities(self, weights: Sequence[float] | None) -> np.ndarray:
        """Per shard: its source's weight times its share of that source's tokens; without weights,
        every shard in proportion to its tokens."""
        tokens = np.array([self.indexes[i].shards[j].tokens for i, j in self.shards], dtype=np.float64)
        if weights is None:
            return tokens / tokens.sum()
        if len(weights) != len(self.indexes) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per shard directory ({len(self.indexes)}), "
                             f"got {list(weights)}")
        source_tokens = np.array([max(1, self.indexes[i].tokens) for i, _ in self.shards], dtype=np.float64)
        p = np.array([weights[i] for i, _ in self.shards], dtype=np.float64) * tokens / source_tokens
        return p / p.sum()

    @lru_cache(maxsize=8)
    def _dealt(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        used = n // self.streams * self.streams
        return tuple(tuple(int(k) for k in order[g:used:self.streams]) for g in range(self.streams))

    def shard_at(self, epoch: int, stream: int, position: int) -> tuple[int, int]:
        """The (index, shard) a stream reads at `position` of its sequence for `epoch`. Exact mode
        wraps around its list (only needed when shards were skipped as corrupt)."""
        if not self.resampled:
            dealt = self._dealt(epoch)[stream]
            return self.shards[dealt[position % len(dealt)]]
        return self.shards[self._draws(epoch, stream, position // _DRAW_CHUNK)[position % _DRAW_CHUNK]]

    @lru_cache(maxsize=64)
    def _draws(self, epoch: int, stream: int, chunk: int) -> tuple[int, ...]:
        rng = np.random.default_rng([self.seed, epoch, stream, chunk])
        return tuple(int(k) for k in rng.choice(len(self.shards), size=_DRAW_CHUNK, p=self.probabilities))

    def shards_per_epoch(self, epoch: int, stream: int) -> int:
        """How many distinct positions a stream's exact-mode list has (resampled: unbounded)."""
        return len(self._dealt(epoch)[stream]) if not self.resampled else 1 << 62

    @lru_cache(maxsize=8)
    def batches_per_stream(self, epoch: int) -> int:
        """Batches every stream yields in `epoch` (the same on all ranks)."""
        if self.resampled:
            return int(self.min_tokens.sum()) // self.block_tokens // self.streams // self.micro_batch_size
        return min(int(self.min_tokens[list(dealt)].sum()) // self.block_tokens // self.micro_batch_size
                   for dealt in self._dealt(epoch))
