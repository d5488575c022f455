"""The index beside a shard directory: what each shard holds and which tokenizer made it.

`index.json` is written last, atomically, so a directory with an index is complete. The loader
trusts it for planning (documents and tokens per shard) and checks each shard's size against it;
the tokenizer fingerprint guards against training a model on ids from another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calm_dist.data.atomic import atomic_write_json

INDEX_NAME = "index.json"
INDEX_FORMAT = "calm-dist-token-shards"
INDEX_VERSION = 1


class TokenizerMismatchError(ValueError):
    """Shards were made with another tokenizer than the one the model uses."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the shard directory
    docs: int
    tokens: int  # document tokens, without the BOS/EOS/PAD that packing adds
    bytes: int  # the file's size, checked before reading (a truncated copy fails loudly)
    sha256: str


@dataclass
class ShardIndex:
    """The contents of `index.json`; `directory` is where it was loaded from (not stored)."""

    tokenizer_name: str
    tokenizer_fingerprint: str
    vocab_size: int  # PAD included
    bos_id: int
    eos_id: int
    pad_id: int
    dtype: str  # numpy dtype of the stored ids: uint16 when the vocabulary fits, else uint32
    shards: list[ShardInfo]
    split: str = "train"
    settings: dict[str, Any] = field(default_factory=dict)  # how it was prepared (rerun check)
    stats: dict[str, Any] = field(default_factory=dict)  # documents skipped, sources, timings
    directory: Path = field(default=Path("."), compare=False)
    # Remote shards: a WebDataset URL with "{shard}" for the file name (not stored; see load_index).
    url_template: str = field(default="", compare=False)

    @property
    def docs(self) -> int:
        return sum(s.docs for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard_path(self, i: int) -> Path | str:
        """A local path, or the URL of a remote shard."""
        if self.url_template:
            return self.url_template.format(shard=self.shards[i].name)
        return self.directory / self.shards[i].name

    def content_fingerprint(self) -> str:
        """Identifies the shards' contents (names and hashes), for loader-state checks."""
        text = "\n".join(f"{s.name} {s.sha256}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        data.pop("url_template")
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, **data}

    def save(self) -> None:
        atomic_write_json(self.directory / INDEX_NAME, self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> "ShardIndex":
        where = directory / INDEX_NAME
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{where}: not a calm-dist shard index (format {data.get('format')!r})")
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"{where}: index version {data.get('version')} is not supported "
                             f"(this calm-dist reads version {INDEX_VERSION}); prepare the data again")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        fields["shards"] = [ShardInfo(**s) for s in fields["shards"]]
        return cls(**fields, directory=directory)


def is_shard_url(spec) -> bool:
    """A remote shard directory: a URL template with "{shard}" standing for each file name."""
    return isinstance(spec, str) and "{shard}" in spec


def _load_remote_index(template: str) -> ShardIndex:
    """index.json and the shards read through WebDataset's URL opener: `pipe:CMD` (object stores:
    e.g. "pipe:aws s3 cp s3://bucket/train/{shard} -"), http(s)://, or a plain path."""
    from webdataset.gopen import gopen  # lazy: webdataset imports torch (~1 s); only a remote index needs it

    url = template.format(shard=INDEX_NAME)
    try:
        with gopen(url, "rb") as stream:
            data = json.loads(stream.read())
    except Exception as err:  # a failed pipe, a 404, bad JSON: all say which URL
        raise FileNotFoundError(f"{url}: cannot read the shard index ({type(err).__name__}: {err})") from err
    index = ShardIndex.from_json(data, Path("."))
    index.url_template = template
    index.directory = Path(template.replace("{shard}", ""))  # for messages only
    if not index.shards:
        raise ValueError(f"{url}: the index lists no shards (was the input empty?)")
    return index


def load_index(path_or_index: "str | Path | ShardIndex") -> ShardIndex:
    """A ShardIndex from a shard directory or its index.json (an index passes through), or from a
    remote directory given as a URL template with "{shard}" (see `_load_remote_index`)."""
    if isinstance(path_or_index, ShardIndex):
        return path_or_index
    if is_shard_url(path_or_index):
        return _load_remote_index(path_or_index)
    path = Path(path_or_index)
    if path.name == INDEX_NAME and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such shard directory (prepare one with calm-prepare-data)")
    index_file = path / INDEX_NAME
    if not index_file.is_file():
        what = "holds shards but no" if any(path.glob("*.tar")) else "holds no shards and no"
        raise FileNotFoundError(f"{path} {what} {INDEX_NAME}: run calm-prepare-data (again) to finish "
                                "preparing it; an interrupted run resumes")
    index = ShardIndex.from_json(json.loads(index_file.read_text()), path)
    if not index.shards:
        raise ValueError(f"{path}: the index lists no shards (was the input empty?)")
    return index


def check_tokenizer(path_or_index: "str | Path | ShardIndex", tokenizer_or_fingerprint) -> None:
    """Raise TokenizerMismatchError when the shards were made with another tokenizer.

    `tokenizer_or_fingerprint` is a Tokenizer (anything with `.fingerprint()`) or the fingerprint.
    """
    index = load_index(path_or_index)
    expected = tokenizer_or_fingerprint
    if hasattr(expected, "fingerprint"):
        expected = expected.fingerprint()
    if index.tokenizer_fingerprint != expected:
        raise TokenizerMismatchError(
            f"shards in {index.directory} were made with tokenizer {index.tokenizer_name!r} "
            f"(fingerprint {index.tokenizer_fingerprint}), but the model uses fingerprint {expected}: "
            "prepare the data again with this tokenizer, or point data.tokenizer at the one the "
            "shards were made with"
        )


def id_mismatches(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, model_cfg) -> list[tuple[str, int, int]]:
    """(model field, the data's value, the model's) for each of the vocabulary size and special
    ids on which data (shards, a tokenizer) and a model's config disagree: token ids must mean
    what they meant in training."""
    pairs = {"vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    return [(name, theirs, getattr(model_cfg, name)) for name, theirs in pairs.items()
            if theirs != getattr(model_cfg, name)]
