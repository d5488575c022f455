"""`calm-prepare-data OUT --synthetic det|markov`: a synthetic source's shards, tokenizer and law.

Writes OUT/tokenizer.json (words s0 .. s{V-1} at ids 0..V-1, then <|endoftext|> and <|pad|>),
OUT/train and OUT/valid (shards + index.json, written from the ids directly: there is no text to
tokenize) and OUT/synthetic.json (the law and its closed-form Brier levels, see
calm_dist.data.synthetic). The same arguments give the same files; a rerun resumes or returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from calm_dist.data.atomic import PARTIAL_SUFFIX, atomic_write_json
from calm_dist.data.index import ShardIndex
from calm_dist.data.prepare import (BUNDLED_SHARD_TOKENS, TOKENIZER_FILE, PreparedData, _finished_split,
                                    _index_fields)
from calm_dist.data.shards import ShardWriter
from calm_dist.data.synthetic import (DEFAULT_DOC_TOKENS, DEFAULT_Q, DEFAULT_TRAIN_TOKENS, DEFAULT_VOCAB,
                                      SyntheticSource, boundary_fraction, chunk_marginal_brier, make_source,
                                      optimal_brier, optimal_brier_range, sample_documents, unconditional_brier)
from calm_dist.data.tokenizer import ENDOFTEXT, PAD, Tokenizer, load_tokenizer
from calm_dist.ops.brier import brierlm_from_means

LAW_FILE = "synthetic.json"
VALID_SHARE = 10  # the valid split gets train tokens / 10
BATCH_DOCS = 64  # documents drawn together; fixed, so that a seed always gives the same stream


def word(token: int) -> str:
    return f"s{token}"


def synthetic_tokenizer_json(vocab: int) -> str:
    """A WordLevel tokenizer: the content words, then the two specials; text is words split on
    whitespace and decodes back to them joined by spaces."""
    words = {word(i): i for i in range(vocab)} | {ENDOFTEXT: vocab, PAD: vocab + 1}
    backend = HFTokenizer(models.WordLevel(words, unk_token="[UNK]"))  # not in the vocabulary: other words fail
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([ENDOFTEXT, PAD])
    return backend.to_str(pretty=True)


def law_summary(source: SyntheticSource, doc_tokens: int) -> dict:
    """The closed-form Brier-1..4 and BrierLM levels of a source (what synthetic.json holds)."""
    levels = {"optimal": optimal_brier(source), "chunk_marginal": chunk_marginal_brier(source),
              "unconditional": unconditional_brier(source)}
    return {**{f"{name}_brier": values for name, values in levels.items()},
            **{f"{name}_brierlm": brierlm_from_means(values) for name, values in levels.items()},
            "boundary_fraction": boundary_fraction(doc_tokens),
            "optimal_on_eval_blocks": optimal_brier_range(source, doc_tokens)}


def _split_documents(source: SyntheticSource, split_stream: int, docs: int, doc_tokens: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([source.seed, split_stream])
    for start in range(0, docs, BATCH_DOCS):
        yield from sample_documents(source, min(BATCH_DOCS, docs - start), doc_tokens, rng)


def _write_split(writer: ShardWriter, documents: Iterator[np.ndarray], vocab: int) -> ShardIndex:
    words = np.array([word(i) for i in range(vocab)])
    stats = {"docs": 0, "tokens": 0, "resumed_docs": 0}
    for ids in documents:
        text = " ".join(words[ids])  # what the tokenizer encodes to these ids; hashed for resume
        if writer.skip(text):
            stats["resumed_docs"] += 1
            continue
        writer.add(ids, text)
        stats["docs"] += 1
        stats["tokens"] += len(ids)
    return writer.finish(stats)


def prepare_synthetic(out_dir: str | Path, kind: str, *, vocab: int = DEFAULT_VOCAB, q: float = DEFAULT_Q,
                      seed: int = 0, train_tokens: int = DEFAULT_TRAIN_TOKENS,
                      doc_tokens: int = DEFAULT_DOC_TOKENS, shard_tokens: int = BUNDLED_SHARD_TOKENS,
                      overwrite: bool = False) -> PreparedData:
    """Shards of the source `kind` ('det' or 'markov'): about `train_tokens` train tokens and a
    tenth of that for validation, in whole documents of `doc_tokens` tokens."""
    source = make_source(kind, vocab, q, seed)
    if doc_tokens < 2:
        raise ValueError(f"documents need >= 2 tokens (--synthetic-doc-tokens), got {doc_tokens}")
    if train_tokens < 1:
        raise ValueError(f"--synthetic-tokens must be >= 1, got {train_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer lands under its final name only once the splits are known to fit it.
    partial = out_dir / (TOKENIZER_FILE + PARTIAL_SUFFIX)
    partial.write_text(synthetic_tokenizer_json(vocab))
    tokenizer: Tokenizer = load_tokenizer(partial)
    tokenizer.name = TOKENIZER_FILE
    docs = {"train": math.ceil(train_tokens / doc_tokens),
            "valid": math.ceil(max(1, train_tokens // VALID_SHARE) / doc_tokens)}
    law = {k: v for k, v in source.params().items() if not k.startswith("perm")}
    settings = {"source": f"synthetic {kind}", "synthetic": {**law, "doc_tokens": doc_tokens, "docs": docs},
                "shard_tokens": shard_tokens}
    fields = {split: _index_fields(tokenizer, split, settings) for split in docs}
    try:
        done = {split: _finished_split(out_dir / split, fields[split], overwrite) for split in docs}
    except ValueError:
        partial.unlink()
        raise
    partial.replace(out_dir / TOKENIZER_FILE)

    indexes = dict(done)
    for stream, split in enumerate(docs, start=1):
        if done[split] is None:
            writer = ShardWriter(out_dir / split, split, fields[split], shard_tokens)
            indexes[split] = _write_split(writer, _split_documents(source, stream, docs[split], doc_tokens), vocab)
    summary = law_summary(source, doc_tokens)
    atomic_write_json(out_dir / LAW_FILE, {**law, "doc_tokens": doc_tokens, **summary, **source.params()})
    return PreparedData(indexes["train"], indexes["valid"], out_dir / TOKENIZER_FILE,
                        {"synthetic": {**law, **summary}, "already_prepared": all(done.values())})


def model_overrides(prepared: PreparedData) -> list[str]:
    """The data.* and model.* settings a run on these shards needs (as the quickstart passes them)."""
    train = prepared.train
    return [f"data.train_path={train.directory}", f"data.valid_path={prepared.valid.directory}",
            f"data.tokenizer={prepared.tokenizer_path}", f"model.vocab_size={train.vocab_size}",
            f"model.pad_token_id={train.pad_id}", f"model.bos_token_id={train.bos_id}",
            f"model.eos_token_id={train.eos_id}"]


def report(prepared: PreparedData, out_dir: Path) -> str:
    """What the command prints after the usual shard summary: the law's levels and the overrides."""
    law = prepared.stats["synthetic"]

    def levels(name: str) -> str:
        values = " ".join(f"{b:.4g}" for b in law[f"{name}_brier"])
        return f"Brier-1..4 {values}, BrierLM {law[f'{name}_brierlm']:.2f}"

    low, high = law["optimal_on_eval_blocks"]["brierlm"]
    q = f", q={law['q']}" if law["source"] == "markov" else ""
    return "\n".join([
        f"law: {law['source']} chain over {law['vocab']} tokens{q} (seed {law['seed']}); {out_dir / LAW_FILE}",
        f"  optimal        {levels('optimal')} (on eval blocks: BrierLM in [{low:.2f}, {high:.2f}])",
        f"  chunk marginal {levels('chunk_marginal')} (knows the n-gram law, not the token before)",
        f"  unconditional  {levels('unconditional')}",
        "train with: " + " ".join(model_overrides(prepared)),
    ])
