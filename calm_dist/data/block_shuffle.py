"""Block-level shuffle: a stream's blocks served in seeded permutations of windows of W blocks.

Cut back to back, a stream's blocks run through one document after another, so a micro-batch
would be a few consecutive blocks of ONE document and successive steps would walk through it.
Such correlated batches stall CALM (its head collapses to a constant output). Mixing documents
inside one shard is not enough (a long document fills many batches), so blocks are mixed:

- each epoch of a stream is split into windows of W blocks counted from the epoch's first block
  (window n holds blocks nW .. nW+W-1; the epoch's last window is shorter);
- a window is read whole, permuted with a generator seeded by (seed, epoch, stream, n), and
  served in that order; batches take the served blocks in turn and may straddle windows.

The epoch's block count, and so every stream's batch count, is the planner's as before. Resume
needs no buffer contents: for the block served next, the position where its window starts in the
unshuffled stream is enough, since the blocks served from the window follow from the epoch's block
count (batches x micro_batch_size). A resumed stream re-reads the window from that position,
permutes it identically and skips the served blocks. Memory: W blocks per stream (DataLoader
worker). W <= 1 serves the stream in its plain order.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import numpy as np

P = TypeVar("P")  # a position in the unshuffled stream, opaque here

DEFAULT_SHUFFLE_BLOCKS = 1024  # the window W (= data.shuffle_blocks' default)
_SALT = 0x626C6B  # "blk": these seeds never coincide with the planner's shard or document seeds


def window_order(size: int, key: Sequence[int], window: int) -> np.ndarray:
    """The order window number `window` of `size` blocks is served in."""
    if size <= 1:
        return np.arange(size)
    return np.random.default_rng([*key, window, _SALT]).permutation(size)


def shuffle_windows(blocks: Iterator[tuple[np.ndarray, P]], window: int, first: int, end: int, start: P,
                    key: Sequence[int]) -> Iterator[tuple[np.ndarray, P]]:
    """Serve blocks number first .. end-1 of an epoch, each window of `window` blocks permuted.

    `blocks` yields (block, position after it) in the unshuffled order, beginning at the start of
    the window that holds block `first`, a position given as `start`; `key` seeds the permutations
    (seed, epoch, stream). Yields (block, resume position): where the window of the NEXT block to
    serve starts, which is the stream's resume state together with the count of blocks served.
    """
    w = max(1, window)
    number = first - first % w  # the epoch's block number the current window starts at
    skip = first - number  # blocks of it served before a resume
    while number < end:
        size = min(w, end - number)
        held = []
        for _ in range(size):
            block, after = next(blocks)
            held.append(block)
        for i, k in enumerate(window_order(size, key, number // w)[skip:], start=skip):
            yield held[k], (after if i == size - 1 else start)
        start, number, skip = after, number + size, 0
