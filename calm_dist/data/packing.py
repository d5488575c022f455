"""Packing documents into fixed-length blocks, the reference's two ways plus evaluation's.

  "lm"   BOS + doc, documents concatenated (CALM LM and baseline training, CALM.md §2.6)
  "ae"   BOS + doc + EOS, right-padded with PAD to a multiple of K (autoencoder training, §1.3):
         with block_tokens a multiple of K, no K-chunk straddles two documents
  "eval" BOS + doc + EOS, documents concatenated (evaluation blocks, §9.7)

A block holds context + one target step (`calm_dist.config.rules.block_tokens`; §9.7). Blocks
are cut from the concatenated stream back to back; a document may run across blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np

Packing = Literal["lm", "ae", "eval"]
PACKINGS: tuple[str, ...] = ("lm", "ae", "eval")


@dataclass(frozen=True)
class Packer:
    mode: Packing
    bos_id: int
    eos_id: int
    pad_id: int
    patch_size: int = 1  # K; only "ae" pads to it

    def __post_init__(self):
        if self.mode not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.mode!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")

    def check_block(self, block_tokens: int) -> None:
        if block_tokens < 2:
            raise ValueError(f"block_tokens must be >= 2, got {block_tokens}")
        if self.mode == "ae" and block_tokens % self.patch_size:
            raise ValueError(f"autoencoder packing needs block_tokens ({block_tokens}) to be a multiple of "
                             f"patch_size K ({self.patch_size}), or chunks would straddle documents")

    def extra_tokens(self) -> int:
        """Tokens packing adds to every document at least (padding may add more)."""
        return 1 if self.mode == "lm" else 2

    def pack(self, ids: np.ndarray) -> np.ndarray:
        """One document as it appears in the stream, as int64."""
        n = len(ids)
        total = n + self.extra_tokens()
        if self.mode == "ae":
            total += -total % self.patch_size
        out = np.empty(total, dtype=np.int64)
        out[0] = self.bos_id
        out[1:n + 1] = ids
        if self.mode != "lm":
            out[n + 1] = self.eos_id
            out[n + 2:] = self.pad_id
        return out


def cut_blocks(packed_docs: Iterable[tuple[object, np.ndarray]], block_tokens: int,
               first_offset: int = 0) -> Iterator[tuple[np.ndarray, tuple[object, int]]]:
    """Cut the concatenation of packed documents into blocks.

    `packed_docs` yields (position, tokens) per document; the first document's first
    `first_offset` tokens are dropped (they went into earlier blocks). Yields (block, cursor) where
    cursor = (position of the document the block ends in, tokens of it used so far): where the
    next block starts, enough to resume exactly. The incomplete remainder is dropped.
    """
    parts: list[np.ndarray] = []
    have = 0
    offset = first_offset
    for position, tokens in packed_docs:
        start = offset
        offset = 0
        while start < len(tokens):
            take = min(block_tokens - have, len(tokens) - start)
            parts.append(tokens[start:start + take])
            have += take
            start += take
            if have == block_tokens:
                block = parts[0] if len(parts) == 1 else np.concatenate(parts)
                yield block, (position, start)
                parts, have = [], 0
