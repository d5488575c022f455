"""WebDataset shards of tokenized documents: writing (resumable) and reading (checked).

A shard is a plain tar that `webdataset.WebDataset` reads as is: one sample per document, key =
the document's 10-digit number, one member `<key>.tokens.npy` holding its ids without specials.
Packing into training blocks happens when loading, so one set of shards serves every stage
(autoencoder packing pads per document to K, LM packing does not; CALM.md §1.3, §2.6).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from calm_dist.data.atomic import atomic_write_bytes, remove_partials
from calm_dist.data.index import INDEX_NAME, ShardIndex, ShardInfo

log = logging.getLogger(__name__)

PROGRESS_NAME = "progress.jsonl"
TOKENS_MEMBER = "tokens.npy"


class CorruptShardError(ValueError):
    """A shard that cannot be read, or does not hold what its index says; names the file."""

    def __init__(self, path: Path | str, reason: str | None = None):
        # One argument is a whole message: how DataLoader re-raises a worker's error in the trainer.
        super().__init__(f"{path}: {reason}" if reason is not None else str(path))
        self.path = path


def same_preparation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two index headers describe the same preparation. The tokenizer counts by its
    fingerprint, not by the name or path it was loaded under."""
    return {k: v for k, v in a.items() if k != "tokenizer_name"} == \
        {k: v for k, v in b.items() if k != "tokenizer_name"}


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _npy_bytes(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes documents into `<prefix>-NNNNNN.tar` shards of about `shard_tokens` tokens each.

    Each shard is built in memory and appears under its final name in one rename, so an
    interrupted run never leaves a half shard that looks whole. `progress.jsonl` lists the finished
    shards with a hash of their documents' text: a rerun with the same settings skips those
    documents without tokenizing them again (`resume_docs`, `skip`) and refuses changed input.
    `finish()` writes `index.json` last.
    """

    def __init__(self, directory: str | Path, prefix: str, index_fields: dict[str, Any],
                 shard_tokens: int):
        self.directory = Path(directory)
        self.prefix = prefix
        self.index_fields = index_fields  # tokenizer_*, vocab/special ids, dtype, split, settings
        self.shard_tokens = shard_tokens
        self.dtype = np.dtype(index_fields["dtype"])
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in remove_partials(self.directory):
            log.info("removed %s, left by an interrupted run", stale)
        self.shards: list[ShardInfo] = []
        self._texts: list[str] = []  # hashes of finished shards' texts, for the resume check
        self._load_progress()
        finished = {s.name for s in self.shards}
        for unlisted in self.directory.glob(f"{prefix}-*.tar"):
            if unlisted.name not in finished:  # renamed but not recorded: written again below
                unlisted.unlink()
        self.resume_docs = sum(s.docs for s in self.shards)
        self._skipped = 0  # documents of finished shards seen again by this run
        self._skip_shard = self._skip_shard_docs = 0
        self._skip_hash = hashlib.sha256()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._hash = hashlib.sha256()

    # resume ------------------------------------------------------------------------------------

    def _load_progress(self) -> None:
        """Read progress.jsonl: a header line, then one line per finished shard, appended after the
        shard landed. A torn last line (a crash while appending) is ignored."""
        path = self.directory / PROGRESS_NAME
        header = {"index_fields": self.index_fields, "shard_tokens": self.shard_tokens}
        lines = path.read_text().splitlines() if path.is_file() else []
        if len(lines) > 1:  # finished shards to resume from, if made the same way
            old = json.loads(lines[0])
            if not same_preparation(old["index_fields"], self.index_fields) or old["shard_tokens"] != self.shard_tokens:
                raise ValueError(
                    f"{self.directory} holds an interrupted preparation with other settings "
                    f"({old['index_fields'].get('settings')} vs {self.index_fields.get('settings')}): "
                    "rerun with the same settings to resume, or pass overwrite / --overwrite"
                )
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            info = ShardInfo(**entry["shard"])
            shard = self.directory / info.name
            if not shard.is_file() or shard.stat().st_size != info.bytes:
                break
            self.shards.append(info)
            self._texts.append(entry["text_sha256"])
        # rewritten with only what was kept, so appends continue from a clean end
        kept = [json.dumps({"shard": asdict(i), "text_sha256": t}) for i, t in zip(self.shards, self._texts)]
        atomic_write_bytes(path, ("\n".join([json.dumps(header), *kept]) + "\n").encode())

    def skip(self, text: str) -> bool:
        """True (and the document is consumed) while it belongs to a shard already written."""
        if self._skipped >= self.resume_docs:
            return False
        self._skip_hash.update(text.encode())
        self._skipped += 1
        shard = self.shards[self._skip_shard]
        self._skip_shard_docs += 1
        if self._skip_shard_docs == shard.docs:
            if self._skip_hash.hexdigest() != self._texts[self._skip_shard]:
                raise ValueError(
                    f"{self.directory}: the input changed since the interrupted run (documents of "
                    f"{shard.name} differ): pass overwrite / --overwrite to start again"
                )
            self._skip_hash = hashlib.sha256()
            self._skip_shard += 1
            self._skip_shard_docs = 0
        return True

    # writing -----------------------------------------------------------------------------------

    def add(self, ids: list[int] | np.ndarray, text: str) -> None:
        self._pending.append(np.asarray(ids, dtype=self.dtype))
        self._pending_tokens += len(ids)
        self._hash.update(text.encode())
        if self._pending_tokens >= self.shard_tokens:
            self.end_shard()

    def end_shard(self) -> None:
        """Close the current shard now (it also closes by itself at shard_tokens)."""
        if not self._pending:
            return

        number = len(self.shards)
        first_doc = sum(s.docs for s in self.shards)
        buf = io.BytesIO()
        # mtime fixed: the same input gives byte-identical shards, so a rerun's shards match.
        with wds.TarWriter(buf, encoder=False, mtime=0) as tar:
            for i, ids in enumerate(self._pending):
                tar.write({"__key__": f"{first_doc + i:010d}", TOKENS_MEMBER: _npy_bytes(ids)})
        data = buf.getvalue()
        info = ShardInfo(name=f"{self.prefix}-{number:06d}.tar", docs=len(self._pending),
                         tokens=self._pending_tokens, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        atomic_write_bytes(self.directory / info.name, data)
        self.shards.append(info)
        self._texts.append(self._hash.hexdigest())
        with open(self.directory / PROGRESS_NAME, "a") as progress:  # after the shard is durable
            progress.write(json.dumps({"shard": asdict(info), "text_sha256": self._texts[-1]}) + "\n")
            progress.flush()
            os.fsync(progress.fileno())
        self._pending, self._pending_tokens, self._hash = [], 0, hashlib.sha256()

    def finish(self, stats: dict[str, Any] | None = None) -> ShardIndex:
        """Write the last shard and the index; the directory is complete afterwards."""
        if self._skipped < self.resume_docs:
            raise ValueError(f"{self.directory}: the input has fewer documents than the interrupted run "
                             "wrote; pass overwrite / --overwrite to start again")
        self.end_shard()
        index = ShardIndex(**self.index_fields, shards=list(self.shards), stats=stats or {},
                           directory=self.directory)
        index.save()
        (self.directory / PROGRESS_NAME).unlink(missing_ok=True)
        return index


def clear_shard_directory(directory: str | Path, prefix: str) -> None:
    """Remove what a previous preparation wrote (only our own files)."""
    directory = Path(directory)
    for path in [*directory.glob(f"{prefix}-*.tar"), directory / INDEX_NAME, directory / PROGRESS_NAME]:
        path.unlink(missing_ok=True)
    remove_partials(directory)


# reading ---------------------------------------------------------------------------------------


def read_shard(path: str | Path, expected: ShardInfo | None = None, vocab_size: int | None = None) -> list[np.ndarray]:
    """All documents of one shard, in order, as id arrays.

    Raises CorruptShardError naming the file when it is missing or truncated (its size differs
    from the index), its bytes do not match the index's sha256, it is not a readable tar, holds an
    undecodable member, or holds another number of documents than the index says. With
    `vocab_size`, a token id outside [0, vocab_size) is an error naming the shard and the sample.
    """
    if isinstance(path, str) and "://" in path or str(path).startswith("pipe:"):
        raw = _read_url(str(path))  # remote: fetched whole (a shard is a few MB), then checked
    else:
        path = Path(path)
        if not path.is_file():
            raise CorruptShardError(path, "missing" + (" (the index lists it)" if expected is not None else ""))
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise CorruptShardError(path, f"unreadable ({type(err).__name__}: {err})") from err
    if expected is not None:
        check_shard_bytes(path, raw, expected)
    docs: list[np.ndarray] = []
    try:
        for member in tar_file_iterator(io.BytesIO(raw)):
            if not member["fname"].endswith("." + TOKENS_MEMBER):
                continue
            ids = np.load(io.BytesIO(member["data"]), allow_pickle=False)
            if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
                sample = member["fname"].split(".")[0]
                raise CorruptShardError(path, f"sample {sample} holds token id {int(ids.max())}, outside the "
                                              f"vocabulary of {vocab_size}: damaged, or prepared with another "
                                              "tokenizer; prepare the data again")
            docs.append(ids)
    except CorruptShardError:
        raise
    except Exception as err:  # tarfile.ReadError, ValueError from np.load, EOFError, ...
        raise CorruptShardError(path, f"unreadable after {len(docs)} documents "
                                      f"({type(err).__name__}: {err})") from err
    if expected is not None and len(docs) != expected.docs:
        raise CorruptShardError(path, f"holds {len(docs)} documents, the index says {expected.docs}: corrupt")
    return docs


def check_shard_bytes(path, raw: bytes, expected: ShardInfo) -> None:
    """The shard's bytes are the ones the index describes (size, then sha256)."""
    if len(raw) != expected.bytes:
        raise CorruptShardError(path, f"{len(raw)} bytes, the index says {expected.bytes}: truncated or "
                                      "replaced; copy it again or prepare the data again")
    if hashlib.sha256(raw).hexdigest() != expected.sha256:
        raise CorruptShardError(path, f"its bytes do not match the sha256 in {INDEX_NAME}: the file is damaged; "
                                      "copy it again or prepare the data again")


def check_shard_sizes(index: ShardIndex) -> list[CorruptShardError]:
    """Every local shard present with the size the index says (no reading); the problems found."""
    if index.url_template:
        return []  # remote shards are checked when fetched
    problems = []
    for i, info in enumerate(index.shards):
        path = index.shard_path(i)
        size = path.stat().st_size if path.is_file() else -1
        if size < 0:
            problems.append(CorruptShardError(path, "missing (the index lists it)"))
        elif size != info.bytes:
            problems.append(CorruptShardError(path, f"{size} bytes, the index says {info.bytes}: truncated or "
                                                    "replaced; copy it again or prepare the data again"))
    return problems


def verify_shards(index: ShardIndex, shares: tuple[int, int] = (0, 1)) -> list[CorruptShardError]:
    """Read and check the shards of this share (rank r of n checks every n-th from r): size,
    sha256, readability, document count and token ids. The problems found."""
    rank, world = shares
    problems = []
    for i in range(rank, len(index.shards), world):
        try:
            read_shard(index.shard_path(i), index.shards[i], index.vocab_size)
        except CorruptShardError as err:
            problems.append(err)
    return problems


def _read_url(url: str) -> bytes:
    try:
        with gopen(url, "rb") as stream:
            return stream.read()
    except Exception as err:  # a failing pipe command raises on close
        raise CorruptShardError(url, f"could not be read ({type(err).__name__}: {err})") from err


def iter_index_documents(index: ShardIndex) -> Iterator[np.ndarray]:
    """Every document of a shard directory, in index order (evaluation; no shuffling)."""
    for i, info in enumerate(index.shards):
        yield from read_shard(index.shard_path(i), info, index.vocab_size)
