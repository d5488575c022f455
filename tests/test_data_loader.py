"""The training loader: real DataLoader worker processes, 2 ranks x 2 workers, exactly-once epochs,
disjoint shards across ranks, seeded determinism, exact resume (torch.equal), packings, bad shards.

Shards here hold synthetic documents whose ids say which document they are, so coverage and
order can be checked exactly; test_data_prepare.py covers real text.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from calm_dist.data.index import ShardIndex, load_index
from calm_dist.data.loader import build_train_loader, read_eval_blocks
from calm_dist.data.shards import CorruptShardError, ShardWriter

BOS, PAD, FIRST_ID = 0, 1, 2  # synthetic specials: BOS = EOS = 0, PAD = 1; document ids from 2 on


def write_shards(directory, shards: list[list[np.ndarray]]) -> ShardIndex:
    """One shard per inner list, through the real writer."""
    fields = {"tokenizer_name": "synthetic", "tokenizer_fingerprint": "synthetic0000000", "vocab_size": 1 << 16,
              "bos_id": BOS, "eos_id": BOS, "pad_id": PAD, "dtype": "uint16", "split": "train", "settings": {}}
    writer = ShardWriter(directory, "train", fields, shard_tokens=1 << 30)
    for docs in shards:
        for ids in docs:
            writer.add(ids, str(ids[:4]))
        writer.end_shard()
    return writer.finish()


def one_block_docs(directory, docs_per_shard: list[int], block: int) -> ShardIndex:
    """Documents of block-1 ids (one LM-packed document = one block), all ids = document number."""
    shards, k = [], 0
    for n in docs_per_shard:
        shards.append([np.full(block - 1, FIRST_ID + k + i) for i in range(n)])
        k += n
    return write_shards(directory, shards)


def doc_of(batch: torch.Tensor) -> list[int]:
    assert (batch[:, 0] == BOS).all()
    return (batch[:, 1] - FIRST_ID).tolist()


def take(loader, n):
    return [next(loader) for _ in range(n)]


BLOCK, MB = 16, 2


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """8 shards x 6 one-block documents: 48 documents, 12 per stream for 2 ranks x 2 workers."""
    return one_block_docs(tmp_path_factory.mktemp("even"), [6] * 8, BLOCK)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """11 shards of random-length documents with unique ids: blocks run across documents."""
    rng = np.random.default_rng(0)
    shards, next_id = [], FIRST_ID
    for _ in range(11):
        docs = []
        for _ in range(int(rng.integers(3, 9))):
            n = int(rng.integers(1, 40))
            docs.append(np.arange(next_id, next_id + n))
            next_id += n
        shards.append(docs)
    assert next_id < 1 << 16
    return write_shards(tmp_path_factory.mktemp("ragged"), shards)


def test_two_ranks_two_workers_read_each_document_once_per_epoch_from_disjoint_shards(even):
    loaders = [build_train_loader(even.directory, BLOCK, MB, rank, 2, 2, seed=7) for rank in (0, 1)]
    per_epoch = loaders[0].batches_per_epoch()
    assert per_epoch == loaders[1].batches_per_epoch() == 48 // 2 // MB
    shard_of = {d: d // 6 for d in range(48)}
    seen_by_epoch = []
    for epoch in (0, 1):
        docs = {rank: sum((doc_of(b) for b in take(loaders[rank], per_epoch)), []) for rank in (0, 1)}
        assert all(loader.epoch == epoch + 1 for loader in loaders)
        both = docs[0] + docs[1]
        assert sorted(both) == list(range(48))  # exactly once across ranks and workers
        shards = [{shard_of[d] for d in docs[rank]} for rank in (0, 1)]
        assert not shards[0] & shards[1]  # ranks read disjoint shards
        seen_by_epoch.append(docs[0])
    assert seen_by_epoch[0] != seen_by_epoch[1]  # a fresh shuffle every epoch
    for loader in loaders:
        loader.close()


def test_uneven_shards_still_give_every_rank_the_same_number_of_batches(tmp_path):
    index = one_block_docs(tmp_path, [9, 2, 5, 3, 7, 4, 8], BLOCK)  # 7 shards, 4 streams
    loaders = [build_train_loader(index.directory, BLOCK, MB, rank, 2, 2, seed=0) for rank in (0, 1)]
    for epoch in range(3):
        counts = {loader.batches_per_epoch(epoch) for loader in loaders}
        assert len(counts) == 1 and counts.pop() >= 1
    docs = [sum((doc_of(b) for b in take(loader, loader.batches_per_epoch())), []) for loader in loaders]
    assert len(set(docs[0] + docs[1])) == len(docs[0] + docs[1])  # nothing read twice within the epoch


def test_same_seed_same_batches_other_seed_other_order(ragged):
    a, b, c = (build_train_loader(ragged.directory, 24, 3, 0, 1, 0, seed=s) for s in (1, 1, 2))
    first = take(a, 6)
    assert all(torch.equal(x, y) for x, y in zip(first, take(b, 6)))
    assert not all(torch.equal(x, y) for x, y in zip(first, take(c, 6)))
    assert first[0].dtype == torch.long and first[0].shape == (3, 24)


@pytest.mark.parametrize("workers, past_epoch", [(2, 0), (2, 1), (0, 1)])
def test_resume_continues_with_exactly_the_next_batches(ragged, workers, past_epoch):
    """Resume after a number of batches that is not a multiple of the workers, within the first
    epoch or past its end; the state goes through JSON like a checkpoint."""
    args = (ragged.directory, 12, 2, 1, 2, workers)
    reference = build_train_loader(*args, seed=3)
    consumed = reference.batches_per_epoch() * past_epoch + 3
    take(reference, consumed)
    assert reference.epoch == past_epoch
    state = json.loads(json.dumps(reference.state_dict()))
    expected = take(reference, 7)
    reference.close()
    resumed = build_train_loader(*args, seed=3)
    resumed.load_state_dict(state)
    got = take(resumed, 7)
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert len(json.dumps(state)) < 1000  # small: it goes into every checkpoint


def test_resume_resampled_and_autoencoder_packing(ragged):
    kwargs = dict(packing="ae", patch_size=4, resampled=True)
    reference = build_train_loader(ragged.directory, 16, 2, 0, 2, 2, seed=5, **kwargs)
    take(reference, 3)
    state = reference.state_dict()
    expected = take(reference, 4)
    reference.close()
    resumed = build_train_loader(ragged.directory, 16, 2, 0, 2, 2, seed=5, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, take(resumed, 4)))
    resumed.close()


def test_resume_refuses_another_layout_unless_asked_to_restart_the_epoch(ragged):
    a = build_train_loader(ragged.directory, 12, 2, 0, 1, 0, seed=3)
    take(a, 3)
    state = a.state_dict()
    b = build_train_loader(ragged.directory, 12, 2, 0, 2, 0, seed=3)  # world size changed
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        b.load_state_dict(state)
    b.load_state_dict(state, strict=False)
    assert b.epoch == 1


def test_autoencoder_packing_keeps_chunks_inside_documents(ragged):
    K = 4
    loader = build_train_loader(ragged.directory, 32, 4, 0, 1, 0, seed=1, packing="ae", patch_size=K)
    chunks = torch.cat(take(loader, 10)).reshape(-1, K)
    starts = (chunks == BOS).nonzero()
    # BOS/EOS are 0 here, so a chunk starts a document (BOS at 0) or ends one (EOS then PADs)
    for row, col in starts.tolist():
        tail = chunks[row, col + 1:]
        assert col == 0 or (tail == PAD).all()
    assert ((chunks == PAD).any(dim=1) <= (chunks == BOS).any(dim=1)).all()  # PAD only after an EOS
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_train_loader(ragged.directory, 30, 4, 0, 1, 0, seed=1, packing="ae", patch_size=K)


def test_lm_packing_is_documents_concatenated_with_bos(ragged):
    loader = build_train_loader(ragged.directory, 10, 1, 0, 1, 0, seed=0, shuffle=False)
    stream = torch.cat(take(loader, 20), dim=1).flatten()
    docs = [d for s in range(len(ragged.shards)) for d in _docs(ragged, s)]
    expected = np.concatenate([np.concatenate([[BOS], d]) for d in docs])[:len(stream)]
    assert torch.equal(stream, torch.from_numpy(expected.astype(np.int64)))


def _docs(index, s):
    from calm_dist.data.shards import read_shard

    return read_shard(index.shard_path(s), index.shards[s])


def test_eval_blocks_and_rank_shares(ragged):
    blocks = read_eval_blocks(ragged.directory, 8)
    stream = np.concatenate([np.concatenate([[BOS], d, [BOS]]) for s in range(len(ragged.shards))
                             for d in _docs(ragged, s)])
    assert blocks.shape == (len(stream) // 8, 8)
    assert torch.equal(blocks.flatten(), torch.from_numpy(stream[:blocks.numel()].astype(np.int64)))
    assert read_eval_blocks(ragged.directory, 8, max_blocks=5).shape == (5, 8)
    halves = [read_eval_blocks(ragged.directory, 8, max_blocks=5, rank=r, world_size=2) for r in (0, 1)]
    assert halves[0].shape == halves[1].shape == (2, 8)
    assert torch.equal(halves[1][0], blocks[1])


def test_shards_are_plain_webdataset(even):
    import webdataset as wds

    urls = [str(even.shard_path(i)) for i in range(len(even.shards))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == 48 and samples[0]["tokens.npy"].dtype == np.uint16


def _copy(index, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(index.directory, target)
    return load_index(target)


def test_truncated_shard_is_named_and_can_be_skipped_and_counted(even, tmp_path, caplog):
    index = _copy(even, tmp_path)
    bad = index.shard_path(3)
    bad.write_bytes(bad.read_bytes()[:700])
    loader = build_train_loader(index.directory, BLOCK, MB, 0, 1, 0, seed=0)
    with pytest.raises(CorruptShardError, match=bad.name + ".*truncated"):
        take(loader, loader.batches_per_epoch())
    # in a worker process the error reaches the trainer with the file name too
    loader = build_train_loader(index.directory, BLOCK, MB, 0, 1, 1, seed=0)
    with pytest.raises(CorruptShardError, match=bad.name):
        take(loader, loader.batches_per_epoch())
    loader.close()
    skipping = build_train_loader(index.directory, BLOCK, MB, 0, 1, 0, seed=0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        take(skipping, skipping.batches_per_epoch())  # a full epoch still comes out
    assert skipping.skipped_shards >= 1 and bad.name in caplog.text


def test_damaged_tar_header_is_caught_by_the_document_count(even, tmp_path):
    index = _copy(even, tmp_path)
    bad = index.shard_path(0)
    data = bytearray(bad.read_bytes())
    data[1024 * 3:1024 * 3 + 512] = b"\xff" * 512  # garbage over a later member header, same size
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=bad.name):
        read_eval_blocks(index.directory, BLOCK)


def test_too_few_shards_for_the_streams_is_a_clear_error(tmp_path):
    index = one_block_docs(tmp_path, [4, 4, 4], BLOCK)
    with pytest.raises(ValueError, match="3 shards cannot be dealt to 4 streams"):
        build_train_loader(index.directory, BLOCK, MB, 0, 2, 2, seed=0)
    with pytest.raises(ValueError, match="too little data"):
        build_train_loader(index.directory, BLOCK, 5, 0, 1, 2, seed=0)
    loader = build_train_loader(index.directory, BLOCK, MB, 0, 2, 2, seed=0, resampled=True)
    assert loader.batches_per_epoch() == 2  # 12 blocks / 4 streams / 2 per batch, x 2 workers


def test_several_shard_directories_exact_and_weighted(tmp_path):
    first = one_block_docs(tmp_path / "a", [4, 4], BLOCK)  # documents 0..7
    second = write_shards(tmp_path / "b", [[np.full(BLOCK - 1, FIRST_ID + 100 + i) for i in range(4)]] * 2)
    both = build_train_loader([first.directory, second.directory], BLOCK, MB, 0, 1, 0, seed=0)
    docs = sum((doc_of(b) for b in take(both, both.batches_per_epoch())), [])
    assert sorted(docs) == list(range(8)) + sorted([100, 101, 102, 103] * 2)
    only_first = build_train_loader([first.directory, second.directory], BLOCK, MB, 0, 1, 0, seed=0,
                                    resampled=True, weights=[1.0, 0.0])
    assert all(d < 8 for b in take(only_first, 8) for d in doc_of(b))
    with pytest.raises(ValueError, match="weights need resampled mode"):
        build_train_loader([first.directory, second.directory], BLOCK, MB, 0, 1, 0, seed=0, weights=[1, 1])


def test_remote_shards_through_a_pipe_url_give_the_same_batches(ragged):
    """A shard directory given as a WebDataset URL template (here `pipe:cat`, as `pipe:aws s3 cp
    .../{shard} -` would be for an object store) reads the index and shards through the URL."""
    from calm_dist.data.index import load_index
    from calm_dist.data.loader import build_train_loader, read_eval_blocks

    url = f"pipe:cat {ragged.directory}/{{shard}}"
    remote = load_index(url)
    assert remote.shards == ragged.shards and str(remote.shard_path(0)).startswith("pipe:cat ")
    kwargs = dict(block_tokens=16, micro_batch_size=2, rank=0, world_size=1, num_workers=0, seed=3)
    local_batches = take(build_train_loader(ragged.directory, **kwargs), 5)
    remote_batches = take(build_train_loader(url, **kwargs), 5)
    assert all(torch.equal(a, b) for a, b in zip(local_batches, remote_batches))
    assert torch.equal(read_eval_blocks(url, 16), read_eval_blocks(ragged.directory, 16))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_index("pipe:cat /nowhere/{shard}")


def test_flipped_token_bytes_fail_the_checksum_and_can_be_skipped_and_counted(even, tmp_path, caplog):
    """A bit flipped inside a document's ids keeps the shard a valid tar of the right size: only the
    index's sha256 sees it. Reading names the shard; skip_corrupt skips and counts it."""
    from calm_dist.data.shards import read_shard

    index = _copy(even, tmp_path)
    bad = index.shard_path(2)
    data = bytearray(bad.read_bytes())
    data[650] ^= 0x01  # the first document's ids (tar header 512 B, npy header 128 B)
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=bad.name + ".*do not match the sha256"):
        read_shard(bad, index.shards[2])
    skipping = build_train_loader(index.directory, BLOCK, MB, 0, 1, 0, seed=0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        batches = take(skipping, skipping.batches_per_epoch())
    assert skipping.skipped_shards >= 1 and bad.name in caplog.text
    served = {doc for batch in batches for doc in doc_of(batch)}
    assert not served & set(range(12, 18))  # none of the damaged shard's 6 documents was trained on


def test_a_token_id_outside_the_vocabulary_names_the_shard_and_the_sample(tmp_path, capsys):
    """Ids beyond the vocabulary in a shard whose index is consistent (so no checksum catches it):
    an error naming the shard and the sample, from the reader and from calm-prepare-data verify."""
    from calm_dist.cli.prepare_data import main as prepare_main
    from calm_dist.data.shards import read_shard, verify_shards

    fields = {"tokenizer_name": "synthetic", "tokenizer_fingerprint": "synthetic0000000", "vocab_size": 100,
              "bos_id": BOS, "eos_id": BOS, "pad_id": PAD, "dtype": "uint16", "split": "train", "settings": {}}
    writer = ShardWriter(tmp_path / "train", "train", fields, shard_tokens=1 << 30)
    for doc in range(8):
        writer.add(np.full(10, 150 if doc == 5 else 7), f"doc {doc}")
    index = writer.finish()
    with pytest.raises(CorruptShardError, match=r"train-000000.tar: sample 0000000005 holds token id 150, "
                                                r"outside the vocabulary of 100"):
        read_shard(index.shard_path(0), index.shards[0], index.vocab_size)
    assert len(verify_shards(index)) == 1
    assert prepare_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "sample 0000000005" in out and "1 damaged" in out
