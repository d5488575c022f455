"""The block-level shuffle (data.shuffle_blocks): batches mix documents, an epoch still serves every
block once, resume stays exact mid-window, it is seeded, 0 keeps the stream order, and a changed
window refuses an exact resume.

Synthetic shards as in test_data_loader.py: token ids say which document (or which token of the
whole corpus) they are, so a block's source and its place in the unshuffled stream are known.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calm_dist.config import ConfigError, load_config, validate
from calm_dist.data.loader import build_train_loader
from calm_dist.data.shards import read_shard
from tests.test_data_loader import BOS, FIRST_ID, take, write_shards

BLOCK, MB = 16, 4


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory):
    """8 shards x 3 documents of exactly 2 batches of LM blocks each (ids = document number): 192
    blocks, each inside one document, so an unshuffled batch is one document."""
    shards = [[np.full(2 * MB * BLOCK - 1, FIRST_ID + 3 * s + d) for d in range(3)] for s in range(8)]
    return write_shards(tmp_path_factory.mktemp("long"), shards)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """11 shards of random-length documents; every token id is unique, so every block is too."""
    rng = np.random.default_rng(1)
    shards, next_id = [], FIRST_ID
    for _ in range(11):
        docs = []
        for _ in range(int(rng.integers(3, 9))):
            n = int(rng.integers(5, 60))
            docs.append(np.arange(next_id, next_id + n))
            next_id += n
        shards.append(docs)
    return write_shards(tmp_path_factory.mktemp("ragged"), shards)


def epoch_blocks(loader) -> list[tuple[int, ...]]:
    """One epoch of the loader's blocks, as hashable rows, in the order served."""
    return [tuple(row) for batch in take(loader, loader.batches_per_epoch()) for row in batch.tolist()]


def docs_in(batch: torch.Tensor) -> set[int]:
    return {int(row.max()) - FIRST_ID for row in batch}  # every id but BOS (0) is the document's


def test_batches_mix_documents(long_docs):
    plain = build_train_loader(long_docs.directory, BLOCK, MB, 0, 1, 0, seed=0, shuffle_blocks=0)
    mixed = build_train_loader(long_docs.directory, BLOCK, MB, 0, 1, 0, seed=0, shuffle_blocks=64)
    assert plain.batches_per_epoch() == mixed.batches_per_epoch() == 24 * 2
    plain_docs = [len(docs_in(b)) for b in take(plain, 48)]
    mixed_docs = [len(docs_in(b)) for b in take(mixed, 48)]
    assert plain_docs == [1] * 48  # what stalled CALM
    assert np.mean(np.array(mixed_docs) > 1) > 0.9 and np.mean(mixed_docs) > 3.0, mixed_docs


def test_an_epoch_serves_the_unshuffled_blocks_once_and_not_in_stream_order(ragged):
    """Two ranks x 2 workers; a window (7) that batches (2) straddle and the epoch's last window
    only partly fills. Per rank, the same blocks as the unshuffled epoch, nothing lost or doubled."""
    for rank in (0, 1):
        args = (ragged.directory, 12, 2, rank, 2, 2)
        plain = build_train_loader(*args, seed=4, shuffle_blocks=0)
        mixed = build_train_loader(*args, seed=4, shuffle_blocks=7)
        assert mixed.batches_per_epoch() == plain.batches_per_epoch()
        stream, served = epoch_blocks(plain), epoch_blocks(mixed)
        assert mixed.epoch == plain.epoch == 1
        assert len(set(stream)) == len(stream) and sorted(served) == sorted(stream)
        place = {block: i for i, block in enumerate(stream)}
        steps = np.diff([place[block] for block in served])
        assert np.mean(steps == 1) < 0.5  # mostly not the next block of the stream
        plain.close(), mixed.close()


@pytest.mark.parametrize("workers, consumed", [(0, 3), (0, 7), (2, 5), (2, 14), (2, 41)])
def test_resume_mid_window_gives_exactly_the_next_batches(ragged, workers, consumed):
    """Window 7 blocks, batches of 2: after 3 or 5 batches resume falls inside a window, after 7
    (one stream) or 14 (two streams) on a window's end, after 41 past the first epoch."""
    args = (ragged.directory, 12, 2, 0, 1, workers)
    reference = build_train_loader(*args, seed=3, shuffle_blocks=7)
    take(reference, consumed)
    state = json.loads(json.dumps(reference.state_dict()))
    served_in_window = [(batches * 2) % 7 for _, batches, *_ in state["streams"]]
    assert any(served_in_window) or consumed in (7, 14)
    expected = take(reference, 16)
    reference.close()
    resumed = build_train_loader(*args, seed=3, shuffle_blocks=7)
    resumed.load_state_dict(state)
    got = take(resumed, 16)
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert len(json.dumps(state)) < 1000  # still a few integers per stream


def test_seeded_same_seed_same_batches_other_seed_other_order(ragged):
    a, b, c = (build_train_loader(ragged.directory, 12, 2, 0, 1, 0, seed=s, shuffle_blocks=16) for s in (5, 5, 6))
    first = take(a, 8)
    assert all(torch.equal(x, y) for x, y in zip(first, take(b, 8)))
    assert not all(torch.equal(x, y) for x, y in zip(first, take(c, 8)))


def test_window_zero_is_the_stream_order(ragged):
    """shuffle_blocks=0 (and 1): the shard-dealt, document-shuffled stream cut back to back, as
    before the block shuffle; rebuilt here from the planner and the document seeds."""
    seed, block = 9, 10
    loader = build_train_loader(ragged.directory, block, 3, 0, 1, 0, seed=seed, shuffle_blocks=0)
    served = torch.cat(take(loader, loader.batches_per_epoch())).flatten()
    docs = []
    for position in range(len(ragged.shards)):
        _, shard = loader.planner.shard_at(0, 0, position)
        shard_docs = read_shard(ragged.shard_path(shard), ragged.shards[shard])
        order = np.random.default_rng([seed, 0, 0, position]).permutation(len(shard_docs))
        docs += [np.concatenate([[BOS], shard_docs[k]]) for k in order]
    expected = np.concatenate(docs)[:len(served)]
    assert torch.equal(served, torch.from_numpy(expected.astype(np.int64)))
    one = build_train_loader(ragged.directory, block, 3, 0, 1, 0, seed=seed, shuffle_blocks=1)
    assert torch.equal(torch.cat(take(one, loader.batches_per_epoch())).flatten(), served)


def test_changed_window_refuses_exact_resume_and_old_states_count_as_window_zero(ragged):
    args = (ragged.directory, 12, 2, 0, 1, 0)
    a = build_train_loader(*args, seed=3, shuffle_blocks=64)
    take(a, 3)
    other = build_train_loader(*args, seed=3, shuffle_blocks=32)
    with pytest.raises(ValueError, match=r"shuffle_blocks \(data.shuffle_blocks\): saved 64, now 32"):
        other.load_state_dict(a.state_dict())
    other.load_state_dict(a.state_dict(), strict=False)
    assert other.epoch == 1

    # a state from before the block shuffle (version 1) is the stream order: window 0
    plain = build_train_loader(*args, seed=3, shuffle_blocks=0)
    take(plain, 3)
    old = {k: v for k, v in plain.state_dict().items() if k != "shuffle_blocks"} | {"version": 1}
    expected = take(plain, 4)
    resumed = build_train_loader(*args, seed=3, shuffle_blocks=0)
    resumed.load_state_dict(old)
    assert all(torch.equal(x, y) for x, y in zip(expected, take(resumed, 4)))
    with pytest.raises(ValueError, match=r"data.shuffle_blocks\): saved 0, now 64"):
        build_train_loader(*args, seed=3, shuffle_blocks=64).load_state_dict(old)
    with pytest.raises(ValueError, match="not a calm-dist loader state"):
        resumed.load_state_dict({**old, "version": 99})


def test_negative_window_is_refused_by_loader_and_config(ragged):
    with pytest.raises(ValueError, match="shuffle_blocks must be >= 0"):
        build_train_loader(ragged.directory, 12, 2, 0, 1, 0, seed=0, shuffle_blocks=-1)
    with pytest.raises(ConfigError, match="data.shuffle_blocks must be >= 0"):
        validate(load_config(["tiny_calm"], ["data.shuffle_blocks=-1"]))
    assert validate(load_config(["tiny_calm"])).data.shuffle_blocks == 1024
