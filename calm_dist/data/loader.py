"""The training loader: endless (micro_batch_size, block_tokens) LongTensor batches with exact resume,
and the evaluation-block reader.

Each DataLoader worker serves one stream of the epoch plan (plan.py) and yields whole batches, each
with its stream's cursor: (epoch, batches done this epoch, shard position, document, offset, shards
skipped). The stream's blocks are mixed in windows of `shuffle_blocks` blocks (block_shuffle.py), so
the cursor's position is where the window of the next block starts. The DataLoader takes workers
in strict round-robin order, so the main process knows which stream the next batch comes from; it
keeps the cursor of every stream as of the last batch it handed out. That list is the whole resume
state, a few integers per worker. A rebuilt loader starts each stream at its cursor (re-reading
and re-permuting the current window, skipping what was served) and rotates the worker-to-stream
assignment so that worker 0 serves the stream whose turn it is: the next batch is exactly the one
that would have come.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from calm_dist.data.block_shuffle import DEFAULT_SHUFFLE_BLOCKS, shuffle_windows
from calm_dist.data.index import ShardIndex, check_tokenizer, load_index
from calm_dist.data.packing import Packer, Packing, cut_blocks
from calm_dist.data.plan import EpochPlanner
from calm_dist.data.shards import CorruptShardError, iter_index_documents, read_shard

log = logging.getLogger(__name__)

STATE_FORMAT = "calm-dist-loader"
STATE_VERSION = 2  # 2: cursors point at window starts and the layout holds shuffle_blocks
# Layout keys that are one config setting each, named in the refusal of a changed layout.
_SETTINGS = {"seed": "data.seed", "workers": "data.num_workers", "resampled": "data.resampled",
             "shuffle_blocks": "data.shuffle_blocks"}


def _named(key: str) -> str:
    return f"{key} ({_SETTINGS[key]})" if key in _SETTINGS else key


class StreamCursor(NamedTuple):
    """Where a stream stands after its last batch handed out. The position (shard_pos, doc, offset,
    skipped) is in the unshuffled stream, at the start of the window the next block comes from."""

    epoch: int = 0
    batches: int = 0  # batches of this epoch done
    shard_pos: int = 0  # position in the stream's shard sequence for the epoch
    doc: int = 0  # document (in the shard's read order) the block before the window ended in
    offset: int = 0  # packed tokens of that document already used
    skipped: int = 0  # corrupt shards skipped so far (skip_corrupt), kept across resumes


def _as_indexes(paths_or_index) -> list[ShardIndex]:
    items = paths_or_index if isinstance(paths_or_index, (list, tuple)) else [paths_or_index]
    indexes = [load_index(item) for item in items]
    if not indexes:
        raise ValueError("no shard directories given")
    first = indexes[0]
    for other in indexes[1:]:
        check_tokenizer(other, first.tokenizer_fingerprint)
    return indexes


class _BlockStreams(IterableDataset):
    """What each worker runs: its stream's batches, epoch after epoch, with cursors."""

    def __init__(self, planner: EpochPlanner, packer: Packer, rank: int, cursors: Sequence[StreamCursor],
                 rotation: int, skip_corrupt: bool, shuffle_blocks: int):
        self.planner, self.packer, self.rank = planner, packer, rank
        self.cursors, self.rotation, self.skip_corrupt = list(cursors), rotation, skip_corrupt
        self.shuffle_blocks = shuffle_blocks

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple[int, tuple[int, ...]]]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.planner.workers
        cursor = self.cursors[worker]
        while True:
            yield from self._epoch(worker, cursor)
            cursor = StreamCursor(cursor.epoch + 1, skipped=self._skipped)

    def _epoch(self, worker: int, cursor: StreamCursor):
        p, mb = self.planner, self.planner.micro_batch_size
        stream = p.stream_id(self.rank, worker)
        self._skipped = cursor.skipped
        end, first = p.batches_per_stream(cursor.epoch) * mb, cursor.batches * mb  # in blocks
        if first >= end:
            return
        blocks = self._blocks(cursor.epoch, stream, cursor.shard_pos, cursor.doc, cursor.offset)
        start = (cursor.shard_pos, cursor.doc, cursor.offset, cursor.skipped)
        served = shuffle_windows(blocks, self.shuffle_blocks, first, end, start, (p.seed, cursor.epoch, stream))
        rows = []
        for number, (block, position) in enumerate(served, start=first + 1):
            rows.append(block)
            if len(rows) == mb:
                yield torch.from_numpy(np.stack(rows)), (worker, (cursor.epoch, number // mb, *position))
                rows = []

    def _blocks(self, epoch: int, stream: int, shard_pos: int, doc: int, offset: int):
        """(block, (shard position, document, offset, shards skipped) after it) in stream order."""
        docs = self._packed_docs(epoch, stream, shard_pos, doc)
        for block, ((shard_pos, doc, skipped), offset) in cut_blocks(docs, self.planner.block_tokens, offset):
            yield block, (shard_pos, doc, offset, skipped)

    def _packed_docs(self, epoch: int, stream: int, shard_pos: int, first_doc: int):
        """((shard position, document, shards skipped), packed tokens) for the stream, from a cursor on."""
        p = self.planner
        barren = 0  # consecutive shards that gave nothing: a stream whose every shard is corrupt
        while True:
            i, j = p.shard_at(epoch, stream, shard_pos)
            index = p.indexes[i]
            try:
                docs = read_shard(index.shard_path(j), index.shards[j], index.vocab_size)
            except CorruptShardError as err:
                if not self.skip_corrupt:
                    raise
                self._skipped += 1
                log.warning("skipping corrupt shard (%d skipped so far): %s", self._skipped, err)
                docs = []
            if p.shuffle:
                order = np.random.default_rng([p.seed, epoch, stream, shard_pos]).permutation(len(docs))
                docs = [docs[k] for k in order]
            barren = barren + 1 if not docs else 0
            if barren >= min(p.shards_per_epoch(epoch, stream), len(p.shards)):
                raise CorruptShardError(index.shard_path(j), "every shard of this stream is unreadable")
            for d in range(first_doc, len(docs)):
                yield (shard_pos, d, self._skipped), self.packer.pack(docs[d])
            shard_pos, first_doc = shard_pos + 1, 0


class TrainLoader:
    """Endless training batches for one rank; Stateful (state_dict / load_state_dict)."""

    def __init__(self, indexes: Sequence[ShardIndex], block_tokens: int, micro_batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, packing: Packing = "lm", patch_size: int = 1,
                 resampled: bool = False, weights: Sequence[float] | None = None, shuffle: bool = True,
                 skip_corrupt: bool = False, prefetch_factor: int = 2, pin_memory: bool = False,
                 shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch_size < 1 or num_workers < 0:
            raise ValueError(f"micro_batch_size must be >= 1 and num_workers >= 0, got {micro_batch_size}, "
                             f"{num_workers}")
        if shuffle_blocks < 0:
            raise ValueError(f"shuffle_blocks must be >= 0, got {shuffle_blocks}")
        first = indexes[0]
        self.packer = Packer(packing, first.bos_id, first.eos_id, first.pad_id, patch_size)
        self.packer.check_block(block_tokens)
        self.rank, self.num_workers = rank, num_workers
        self.skip_corrupt, self.prefetch_factor, self.pin_memory = skip_corrupt, prefetch_factor, pin_memory
        self.planner = EpochPlanner(indexes, world_size, max(1, num_workers), seed, block_tokens,
                                    micro_batch_size, self.packer.extra_tokens(), resampled, weights, shuffle)
        # shuffle=False keeps file order throughout; a window of 1 block is no shuffle either
        self.shuffle_blocks = shuffle_blocks if shuffle and shuffle_blocks > 1 else 0
        self._layout = {
            "world_size": world_size, "workers": self.planner.workers, "rank": rank, "seed": seed,
            "block_tokens": block_tokens, "micro_batch_size": micro_batch_size, "packing": packing,
            "patch_size": patch_size, "resampled": resampled, "shuffle": shuffle,
            "shuffle_blocks": self.shuffle_blocks,
            "weights": list(weights) if weights is not None else None,
            "data": [index.content_fingerprint() for index in indexes],
        }
        self._cursors = [StreamCursor()] * self.planner.workers
        self._next_stream = 0
        self._iterator = None

    # iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = iter(self._dataloader())
        batch, (stream, cursor) = next(self._iterator)
        if stream != self._next_stream:  # the DataLoader's round robin is what exact resume relies on
            raise RuntimeError(f"batch from stream {stream}, expected stream {self._next_stream}")
        self._cursors[stream] = StreamCursor(*cursor)
        self._next_stream = (stream + 1) % self.planner.workers
        return batch

    def _dataloader(self) -> DataLoader:
        dataset = _BlockStreams(self.planner, self.packer, self.rank, self._cursors, self._next_stream,
                                self.skip_corrupt, self.shuffle_blocks)
        workers = self.num_workers
        # An own generator: otherwise making the iterator draws from torch's GLOBAL generator, and
        # a resumed run (which restores that generator first) would be shifted by one draw.
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          prefetch_factor=self.prefetch_factor if workers else None,
                          generator=torch.Generator().manual_seed(self._layout["seed"] + self.rank))

    def close(self) -> None:
        """Stop the worker processes (a later next() starts them again where the state says)."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None

    # progress ----------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        cursor = self._cursors[self._next_stream]
        done = cursor.batches >= self.planner.batches_per_stream(cursor.epoch)
        return cursor.epoch + done

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank (and every other rank) yields in `epoch` (default: the current one)."""
        return self.planner.workers * self.planner.batches_per_stream(self.epoch if epoch is None else epoch)

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far (skip_corrupt), summed over this rank's streams (as of the
        start of each stream's current shuffle window)."""
        return sum(c.skipped for c in self._cursors)

    # Stateful ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's exact position: small, plain Python (JSON and pickle safe)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._layout,
                "next_stream": self._next_stream, "streams": [list(c) for c in self._cursors]}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue exactly after the last batch of the saved loader.

        The data layout (world size, workers, seed, block and batch size, packing, shuffle window,
        shards) must match for an exact resume. With strict=False a changed layout starts at the
        beginning of the epoch after the saved one instead (elastic restarts), with a warning.
        A version 1 state (before the block shuffle) is one with shuffle_blocks 0: same cursors.
        """
        if state.get("format") == STATE_FORMAT and state.get("version") == 1:
            state = {**state, "version": STATE_VERSION, "shuffle_blocks": 0}
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a calm-dist loader state (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        changed = {k: (state.get(k), v) for k, v in self._layout.items() if state.get(k) != v}
        self.close()
        if changed:
            described = ", ".join(f"{_named(k)}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            if strict:
                raise ValueError(f"cannot resume the data loader exactly, the layout changed ({described}); "
                                 "keep it, or load with strict=False to restart at the next epoch")
            epoch = max(c[0] for c in state["streams"]) + 1
            log.warning("data layout changed (%s): starting epoch %d from its beginning", described, epoch)
            self._cursors = [StreamCursor(epoch)] * self.planner.workers
            self._next_stream = 0
            return
        self._cursors = [StreamCursor(*c) for c in state["streams"]]
        self._next_stream = int(state["next_stream"])


def build_train_loader(paths_or_index, block_tokens: int, micro_batch_size: int, rank: int, world_size: int,
                       num_workers: int, seed: int, *, packing: Packing = "lm", patch_size: int = 1,
                       tokenizer=None, resampled: bool = False, weights: Sequence[float] | None = None,
                       shuffle: bool = True, skip_corrupt: bool = False, prefetch_factor: int = 2,
                       pin_memory: bool = False, shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS) -> TrainLoader:
    """An endless loader of LongTensor (micro_batch_size, block_tokens) batches for `rank`.

    `paths_or_index`: a shard directory, its index.json, a ShardIndex, or a list of them (one
    tokenizer). Every rank gets the same number of batches per epoch; epochs cycle forever with a
    fresh shuffle. `tokenizer` (a Tokenizer or fingerprint), when given, must match the shards'.
    `packing`: "lm" (CALM and baseline), "ae" (autoencoder, pads documents to `patch_size`), "eval".
    `shuffle_blocks`: each worker serves its blocks in seeded permutations of windows of this many
    blocks, so a batch mixes documents (0 or 1: blocks in stream order; shuffle=False: file order).
    """
    indexes = _as_indexes(paths_or_index)
    if tokenizer is not None:
        for index in indexes:
            check_tokenizer(index, tokenizer)
    return TrainLoader(indexes, block_tokens, micro_batch_size, rank, world_size, num_workers, seed,
                       packing=packing, patch_size=patch_size, resampled=resampled, weights=weights,
                       shuffle=shuffle, skip_corrupt=skip_corrupt, prefetch_factor=prefetch_factor,
                       pin_memory=pin_memory, shuffle_blocks=shuffle_blocks)


def read_eval_blocks(path_or_index, block_tokens: int, max_blocks: int | None = None, *,
                     packing: Packing = "eval", patch_size: int = 1, rank: int = 0, world_size: int = 1,
                     tokenizer=None) -> torch.Tensor:
    """Validation blocks, LongTensor (n, block_tokens): documents in index order, each as BOS + doc
    + EOS, concatenated and cut into blocks, the remainder dropped (CALM.md §9.7).

    `max_blocks` caps the total; with `world_size` > 1 each rank gets an equal share (every
    world_size-th block from `rank`, the few left over dropped) so ranks evaluate in step.
    """
    index = load_index(path_or_index)
    if tokenizer is not None:
        check_tokenizer(index, tokenizer)
    packer = Packer(packing, index.bos_id, index.eos_id, index.pad_id, patch_size)
    packer.check_block(block_tokens)
    blocks: list[np.ndarray] = []
    docs = (((0, 0), packer.pack(ids)) for ids in iter_index_documents(index))
    for block, _ in cut_blocks(docs, block_tokens):
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
        blocks.append(block)
    usable = len(blocks) - len(blocks) % world_size
    if usable == 0:
        raise ValueError(f"{index.directory}: {index.tokens} tokens give no block of {block_tokens} tokens "
                         f"per rank for {world_size} ranks")
    return torch.from_numpy(np.stack(blocks[:usable][rank::world_size]))
