"""Preparation: real text -> shards -> blocks -> the same text; the index and its tokenizer check;
interrupted runs resume; bad input is named; the CLI and the one-call quickstart helper."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_dist.data.corpus import BadDocumentError, iter_documents, sotu_documents
from calm_dist.data.index import TokenizerMismatchError, check_tokenizer, load_index
from calm_dist.data.loader import build_train_loader, read_eval_blocks
from calm_dist.cli.prepare_data import main
from calm_dist.data.prepare import prepare_bundled_corpus, prepare_shards
from calm_dist.data.shards import PROGRESS_NAME
from calm_dist.data.tokenizer import ENDOFTEXT, load_gpt2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2()


@pytest.fixture(scope="module")
def docs():
    """Nine real documents (the newest speeches) and two awkward ones."""
    return sotu_documents(9) + [f"tricky: naïve 中文 {ENDOFTEXT} inside", "  leading and trailing spaces  "]


def segments(ids: list[int], special: int) -> list[list[int]]:
    out, current = [], []
    for i in ids:
        if i == special:
            out.append(current)
            current = []
        else:
            current.append(i)
    return [s for s in out + [current] if s]


def test_text_round_trips_through_shards_blocks_and_the_loader(gpt2, docs, tmp_path):
    prepared = prepare_shards(docs, gpt2, tmp_path, valid_every=4, shard_tokens=3000)
    train_docs = [d for i, d in enumerate(docs) if i % 4 != 3]
    valid_docs = [d for i, d in enumerate(docs) if i % 4 == 3]
    assert prepared.train.docs == len(train_docs) and prepared.valid.docs == len(valid_docs)
    assert len(prepared.train.shards) > 3
    # evaluation blocks: BOS + doc + EOS, concatenated; block_tokens=2 drops at most the last EOS
    stream = read_eval_blocks(tmp_path / "valid", 2).flatten().tolist()
    assert [gpt2.decode(s) for s in segments(stream, gpt2.eos_id)] == valid_docs
    # the training loader, unshuffled, one rank: BOS + doc concatenated, documents in order
    loader = build_train_loader(tmp_path / "train", 33, 4, 0, 1, 0, seed=0, shuffle=False, tokenizer=gpt2)
    stream = torch.cat(list(next(loader) for _ in range(loader.batches_per_epoch()))).flatten().tolist()
    decoded = [gpt2.decode(s) for s in segments(stream, gpt2.bos_id)]
    assert decoded[:-1] == train_docs[:len(decoded) - 1]
    assert train_docs[len(decoded) - 1].startswith(decoded[-1][:-1])  # the cut-off remainder


def test_index_records_the_tokenizer_and_mismatch_is_a_clear_error(gpt2, sotu_bpe_1k, docs, tmp_path):
    prepare_shards(docs[:3], gpt2, tmp_path, shard_tokens=5000)
    index = load_index(tmp_path / "train")
    assert (index.tokenizer_name, index.tokenizer_fingerprint) == ("gpt2", gpt2.fingerprint())
    assert index.tokens == sum(s.tokens for s in index.shards) == sum(len(gpt2.encode(d)) for d in docs[:3])
    assert index.dtype == "uint16" and (index.bos_id, index.pad_id) == (50256, 50257)
    check_tokenizer(index, gpt2)
    check_tokenizer(tmp_path / "train", gpt2.fingerprint())
    other = sotu_bpe_1k[0].fingerprint()
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizer(tmp_path / "train", sotu_bpe_1k[0])
    assert str(tmp_path / "train") in str(err.value)
    assert gpt2.fingerprint() in str(err.value) and other in str(err.value)
    with pytest.raises(TokenizerMismatchError):
        build_train_loader(tmp_path / "train", 16, 1, 0, 1, 0, seed=0, tokenizer=other)


def _interrupted(docs, after):
    for i, doc in enumerate(docs):
        if i == after:
            raise KeyboardInterrupt("simulated crash")
        yield doc


def test_interrupted_preparation_leaves_only_whole_shards_and_a_rerun_resumes(gpt2, docs, tmp_path):
    kwargs = dict(valid_every=5, shard_tokens=2500, batch_chars=30_000)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(_interrupted(docs, 8), gpt2, tmp_path / "out", **kwargs)
    train = tmp_path / "out" / "train"
    assert not (train / "index.json").exists()  # not a complete directory
    progress = [json.loads(line) for line in (train / PROGRESS_NAME).read_text().splitlines()[1:]]
    recorded = {e["shard"]["name"]: e["shard"] for e in progress}
    assert recorded and sorted(p.name for p in train.glob("*.tar")) == sorted(recorded)
    import hashlib
    for name, info in recorded.items():  # every shard that looks whole is whole
        data = (train / name).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    # what a kill during a write, or between the rename and the progress note, would leave
    (train / "train-000099.tar.partial").write_bytes(b"half a shard")
    (train / f"train-{len(recorded):06d}.tar").write_bytes(b"renamed, not recorded")
    with open(train / PROGRESS_NAME, "a") as f:
        f.write('{"shard": {"name": "torn')  # a crash while appending the progress line

    resumed = prepare_shards(docs, gpt2, tmp_path / "out", **kwargs)
    assert resumed.stats["train_resumed_docs"] > 0 and not list(train.glob("*.partial"))
    fresh = prepare_shards(docs, gpt2, tmp_path / "fresh", **kwargs)
    for split in ("train", "valid"):
        assert getattr(resumed, split).shards == getattr(fresh, split).shards  # same names and sha256
    assert read_eval_blocks(train, 64).shape[0] > 0

    again = prepare_shards(docs, gpt2, tmp_path / "out", **kwargs)
    assert again.stats == {"already_prepared": True}
    with pytest.raises(ValueError, match="other settings"):
        prepare_shards(docs, gpt2, tmp_path / "out", **{**kwargs, "shard_tokens": 999})
    assert prepare_shards(docs, gpt2, tmp_path / "out", **{**kwargs, "shard_tokens": 999},
                          overwrite=True).train.settings["shard_tokens"] == 999


def test_rerun_with_changed_input_refuses_to_mix(gpt2, docs, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(_interrupted(docs, 8), gpt2, tmp_path, shard_tokens=2500, batch_chars=30_000)
    changed = ["a different first document"] + docs[1:]
    with pytest.raises(ValueError, match="input changed"):
        prepare_shards(changed, gpt2, tmp_path, shard_tokens=2500, batch_chars=30_000)


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document. " * 40)
    (folder / "sub" / "b.md").write_text("# Second\n\nmarkdown body " * 30)
    lines = [json.dumps({"text": f"json line {i} " * 20}) for i in range(6)]
    (folder / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder


def test_documents_from_files_and_bad_input_named(text_dir, tmp_path, caplog):
    found = list(iter_documents([text_dir]))
    assert [Path(d.source.split(":")[0]).name for d in found] == ["a.txt", *["c.jsonl"] * 6, "b.md"]
    bad = text_dir / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(BadDocumentError, match="latin1.txt: not valid UTF-8"):
        list(iter_documents([text_dir]))
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING):
        assert len(list(iter_documents([text_dir], skip_bad=True, skipped=skipped))) == 8
    assert skipped == [str(bad)] and "latin1.txt" in caplog.text
    (text_dir / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(BadDocumentError, match=r"d\.jsonl:2: expected a JSON object"):
        list(iter_documents([text_dir / "d.jsonl"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no documents found"):
        list(iter_documents([empty]))


def test_cli_prepares_files_reports_and_fails_clearly(text_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = [str(out), "--input", str(text_dir), "--tokenizer", "gpt2", "--valid-every", "4", "--shard-tokens", "200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train: 6 documents" in printed and "valid: 2 documents" in printed and "M tokens/s" in printed
    assert main(args) == 0 and "already prepared" in capsys.readouterr().out

    (text_dir / "bad.txt").write_bytes(b"\xff\xfe broken")
    assert main([str(tmp_path / "p2"), "--input", str(text_dir)]) == 1
    assert "bad.txt: not valid UTF-8" in capsys.readouterr().err
    assert main([str(tmp_path / "p2"), "--input", str(text_dir), "--skip-bad-documents", "--vocab-size", "300"]) == 1
    assert "every 10th document is held out" in capsys.readouterr().err  # 8 documents: none held out
    assert not (tmp_path / "p2" / "train" / "index.json").exists()  # nothing looks finished
    assert main([str(tmp_path / "p2"), "--input", str(text_dir), "--skip-bad-documents", "--vocab-size", "300",
                 "--valid-every", "3", "--overwrite"]) == 0
    assert "skipped 1 bad documents" in capsys.readouterr().out
    assert load_index(tmp_path / "p2" / "train").stats["skipped_bad_documents"] == {
        "count": 1, "first": [str(text_dir / "bad.txt")]}
    assert (tmp_path / "p2" / "tokenizer.json").is_file()

    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main([str(tmp_path / "p3"), "--input", str(empty)]) == 1
    assert "no documents found" in capsys.readouterr().err


def test_tools_wrapper_runs():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--bundled" in result.stdout


def test_bundled_corpus_in_one_call(tmp_path):
    prepared = prepare_bundled_corpus(tmp_path, vocab_size=512, count=20, shard_tokens=20_000)
    assert prepared.tokenizer_path == tmp_path / "tokenizer.json"
    assert prepared.train.docs == 18 and prepared.valid.docs == 2
    assert prepared.train.vocab_size == 513 and prepared.train.pad_id == 512
    again = prepare_bundled_corpus(tmp_path, vocab_size=512, count=20, shard_tokens=20_000)
    assert again.stats == {"already_prepared": True}
    assert again.train.tokenizer_fingerprint == prepared.train.tokenizer_fingerprint
    loader = build_train_loader(tmp_path / "train", 68, 4, 0, 1, 0, seed=0, packing="ae", patch_size=4)
    batch = next(loader)
    assert batch.shape == (4, 68) and int(batch.max()) <= 512


def test_gzip_and_zstd_inputs_read_like_plain_ones(tmp_path):
    import gzip

    import zstandard

    lines = [json.dumps({"text": f"compressed line {i} " * 5}) for i in range(4)]
    payload = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("a zstd text file".encode()))
    docs = list(iter_documents([tmp_path]))
    texts = [d.text for d in docs]
    assert texts.count("compressed line 0 " * 5) == 2 and "a zstd text file" in texts
    assert len(docs) == 9
