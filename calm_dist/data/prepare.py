"""Text documents -> tokenized WebDataset shards + index.json, per split: the library behind
`calm-prepare-data` (its command line is `calm_dist/cli/prepare_data.py`).

    from calm_dist.data.prepare import prepare_bundled_corpus, prepare_shards
    prepared = prepare_bundled_corpus("data/sotu", vocab_size=4096)   # prepared.train, .valid: ShardIndex

Output: OUT/train/ and OUT/valid/ (shards + index.json each) and, for a trained tokenizer,
OUT/tokenizer.json. Validation holds out every n-th document whole or comes from separate
documents. An interrupted preparation leaves only whole shards; the same call again resumes.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from calm_dist.data.corpus import Document, bundled_documents, is_held_out
from calm_dist.data.index import INDEX_NAME, ShardIndex, load_index
from calm_dist.data.shards import ShardWriter, clear_shard_directory, same_preparation, token_dtype
from calm_dist.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 22  # 4M tokens, 8 MB of uint16 ids per shard
BUNDLED_SHARD_TOKENS = 1 << 16  # the bundled corpus gives ~35 train shards: enough for 8 ranks x 4 workers
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "valid")


@dataclass
class PreparedData:
    """What a preparation produced: the split indexes and, for a trained tokenizer, its file."""

    train: ShardIndex
    valid: ShardIndex | None
    tokenizer_path: Path | None
    stats: dict[str, Any] = field(default_factory=dict)


class _SplitPreparer:
    """Tokenizes one split's documents in batches and hands them to its ShardWriter."""

    def __init__(self, writer: ShardWriter, tokenizer: Tokenizer, batch_chars: int, num_threads: int):
        self.writer, self.tokenizer = writer, tokenizer
        self.batch_chars, self.num_threads = batch_chars, num_threads
        self.texts: list[str] = []
        self.chars = 0
        self.stats = {"docs": 0, "tokens": 0, "empty_docs": 0, "resumed_docs": 0}

    def add(self, text: str) -> None:
        if not text.strip():
            self.stats["empty_docs"] += 1
        elif self.writer.skip(text):
            self.stats["resumed_docs"] += 1
        else:
            self.texts.append(text)
            self.chars += len(text)
            if self.chars >= self.batch_chars:
                self.flush()

    def flush(self) -> None:
        for text, ids in zip(self.texts, self.tokenizer.encode_batch(self.texts, self.num_threads)):
            self.writer.add(ids, text)
            self.stats["docs"] += 1
            self.stats["tokens"] += len(ids)
        self.texts, self.chars = [], 0


def _index_fields(tokenizer: Tokenizer, split: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"tokenizer_name": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id, "dtype": token_dtype(tokenizer.vocab_size), "split": split,
            "settings": settings}


def _finished_split(directory: Path, fields: dict[str, Any], overwrite: bool) -> ShardIndex | None:
    """The split's index when a previous run already finished it with the same settings."""
    if overwrite:
        clear_shard_directory(directory, fields["split"])
        return None
    if not (directory / INDEX_NAME).is_file():
        return None
    index = load_index(directory)
    mine = {k: v for k, v in index.to_json().items() if k in fields}
    if not same_preparation(mine, fields):
        raise ValueError(f"{directory} already holds shards prepared with other settings "
                         f"({mine.get('settings')} vs {fields['settings']}): pass overwrite / --overwrite "
                         "to replace them, or choose another output directory")
    return index


def prepare_shards(documents: Iterable[Document | str], tokenizer: Tokenizer, out_dir: str | Path, *,
                   valid_every: int = 0, valid_documents: Iterable[Document | str] | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, source: str = "", overwrite: bool = False,
                   num_threads: int = 0, batch_chars: int = 1 << 22,
                   skipped_documents: list[str] | None = None) -> PreparedData:
    """Tokenize documents into OUT/train (and OUT/valid) shards with an index each.

    Validation: every `valid_every`-th document of `documents`, or `valid_documents`, or none.
    `source` describes the input (recorded, and compared on a rerun). Reruns resume an interrupted
    preparation and return at once when it is complete; `overwrite` starts again.
    `skipped_documents`: the list iter_documents(skip_bad=True) fills; its count and first names go
    into the index.
    """
    if valid_every and valid_documents is not None:
        raise ValueError("give valid_every or valid_documents, not both")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out_dir = Path(out_dir)
    settings = {"source": source, "valid_every": valid_every, "shard_tokens": shard_tokens}
    splits = SPLITS if (valid_every or valid_documents is not None) else SPLITS[:1]
    fields = {s: _index_fields(tokenizer, s, settings) for s in splits}
    done = {s: _finished_split(out_dir / s, fields[s], overwrite) for s in splits}
    if all(done.values()):
        log.info("%s is already prepared", out_dir)
        return PreparedData(done["train"], done.get("valid"), None, {"already_prepared": True})

    preparers = {s: _SplitPreparer(ShardWriter(out_dir / s, s, fields[s], shard_tokens), tokenizer,
                                   batch_chars, num_threads) for s in splits if done[s] is None}

    # A progress bar on an interactive terminal only (batch logs must not fill with bars).
    bar = tqdm(desc=f"preparing {out_dir}", unit=" docs", disable=not sys.stderr.isatty(), leave=False)

    def route(docs: Iterable[Document | str], split_of) -> None:
        for position, doc in enumerate(docs):
            bar.update(1)
            split = split_of(position)
            if split in preparers:
                preparers[split].add(doc.text if isinstance(doc, Document) else doc)

    start = time.perf_counter()
    route(documents, lambda i: "valid" if is_held_out(i, valid_every) else "train")
    if valid_documents is not None:
        route(valid_documents, lambda i: "valid")
    bar.close()
    for split, preparer in preparers.items():  # check every split before any index makes one look done
        preparer.flush()
        if preparer.stats["docs"] + preparer.stats["resumed_docs"] == 0:
            why = (f"every {valid_every}th document is held out; set valid_every / --valid-every lower, or 0"
                   if split == "valid" and valid_every else "is the input empty?")
            raise ValueError(f"no non-empty documents for the {split} split of {out_dir} ({why})")
    indexes = dict(done)
    skipped = {"skipped_bad_documents": {"count": len(skipped_documents), "first": skipped_documents[:20]}
               } if skipped_documents else {}
    for split, preparer in preparers.items():
        indexes[split] = preparer.writer.finish({**preparer.stats, **skipped})
    seconds = time.perf_counter() - start
    tokens = sum(p.stats["tokens"] for p in preparers.values())
    stats = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
             **{f"{s}_{k}": v for s, p in preparers.items() for k, v in p.stats.items()}}
    return PreparedData(indexes["train"], indexes.get("valid"), None, stats)


def _trained_tokenizer(path: Path, texts: Iterable[str], vocab_size: int, overwrite: bool) -> Tokenizer:
    """Train a byte-level BPE and save it to `path`, or reuse the one an earlier run saved there
    (so a resumed preparation keeps the same ids)."""
    if path.is_file() and not overwrite:
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size != vocab_size + 1:
            raise ValueError(f"{path} has {tokenizer.vocab_size - 1} tokens (+ PAD), not {vocab_size}: pass "
                             "overwrite / --overwrite to train a new one")
    else:
        tokenizer = train_bpe(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    tokenizer.name = TOKENIZER_FILE  # the same on every run, so reruns match the recorded settings
    return tokenizer


def prepare_bundled_corpus(out_dir: str | Path, vocab_size: int = 4096, *, tokenizer: str | Tokenizer | None = None,
                           count: int | None = None, valid_every: int = 10,
                           shard_tokens: int = BUNDLED_SHARD_TOKENS, overwrite: bool = False,
                           num_threads: int = 0) -> PreparedData:
    """The quickstart corpus end to end: the bundled State of the Union speeches (`count` newest, or
    all 249, ~12 MB) -> a byte-level BPE of `vocab_size` trained on the train split (saved as
    OUT/tokenizer.json; or pass `tokenizer`, e.g. "gpt2") -> OUT/train and OUT/valid shards.
    A few seconds on 2 cores."""
    out_dir = Path(out_dir)
    docs = bundled_documents(count)
    tokenizer_path = None
    if tokenizer is None:
        tokenizer_path = out_dir / TOKENIZER_FILE
        train_texts = (d.text for i, d in enumerate(docs) if not is_held_out(i, valid_every))
        tokenizer = _trained_tokenizer(tokenizer_path, train_texts, vocab_size, overwrite)
    elif isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    source = f"bundled sotu speeches ({len(docs)})"
    prepared = prepare_shards(docs, tokenizer, out_dir, valid_every=valid_every, shard_tokens=shard_tokens,
                              source=source, overwrite=overwrite, num_threads=num_threads)
    prepared.tokenizer_path = tokenizer_path
    return prepared
