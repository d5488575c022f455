"""Tokenizers with special-token roles, not fixed ids (CALM.md §9.3).

BOS and EOS come from the tokenizer (byte-level BPE tokenizers use `<|endoftext|>` for both); a PAD
token is added at id V when the tokenizer has none, so the model vocabulary is V + 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class Tokenizer:
    """A HF `tokenizers` tokenizer plus the ids of its special-token roles."""

    backend: "object"  # tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        """Model vocabulary size, PAD included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition, stored beside shards and checked by models."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))


def _with_roles(backend) -> Tokenizer:
    eos = backend.token_to_id(ENDOFTEXT)
    if eos is None:
        raise ValueError(f"tokenizer has no {ENDOFTEXT!r} token: it cannot mark document boundaries")
    if backend.token_to_id(PAD) is None:
        backend.add_special_tokens([PAD])
    # A literal "<|endoftext|>" or "<|pad|>" inside raw text is ordinary text: special ids are only
    # ever inserted by the data pipeline, never produced by encoding a document.
    backend.encode_special_tokens = True
    return Tokenizer(backend, bos_id=eos, eos_id=eos, pad_id=backend.token_to_id(PAD))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE of `vocab_size` tokens (ENDOFTEXT included; PAD is added on top)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _with_roles(backend)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A saved tokenizer.json (as written by `Tokenizer.save`)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}: train one or point to a tokenizer.json")
    return _with_roles(HFTokenizer.from_file(str(path)))
