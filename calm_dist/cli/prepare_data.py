"""`calm-prepare-data`: text documents -> tokenized WebDataset shards + index.json, per split.

    calm-prepare-data data/sotu --bundled --vocab-size 4096         # the quickstart corpus
    calm-prepare-data data/mine --input texts/ --tokenizer gpt2    # your own .txt/.md/.jsonl files
    calm-prepare-data data/markov --synthetic markov                # a known law: does a setup learn?
    calm-prepare-data verify data/sotu                              # every shard against its index

Output: OUT/train/ and OUT/valid/ (shards + index.json each) and, for a trained tokenizer,
OUT/tokenizer.json. Validation holds out every n-th document whole (--valid-every) or comes from
--valid-input. An interrupted run leaves only whole shards; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from calm_dist.data.corpus import is_held_out, iter_documents
from calm_dist.data.prepare import (
    BUNDLED_SHARD_TOKENS,
    DEFAULT_SHARD_TOKENS,
    TOKENIZER_FILE,
    PreparedData,
    _trained_tokenizer,
    prepare_bundled_corpus,
    prepare_shards,
)
from calm_dist.data.synthetic import DEFAULT_DOC_TOKENS, DEFAULT_Q, DEFAULT_TRAIN_TOKENS, DEFAULT_VOCAB, SOURCES
from calm_dist.data.synthetic_prepare import prepare_synthetic, report
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.data.verify import main as verify_main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calm-prepare-data", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output directory (gets train/, valid/ and maybe tokenizer.json)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundled", action="store_true", help="the bundled State of the Union corpus")
    what.add_argument("--input", nargs="+", metavar="PATH",
                      help="text/markdown files (one document each), .jsonl files (one per line), or "
                           "directories of them; .gz works too")
    what.add_argument("--synthetic", choices=SOURCES,
                      help="documents from a Markov chain with a known law, its own tokenizer and the "
                           "closed-form optimal Brier in synthetic.json (docs/data.md)")
    p.add_argument("--valid-input", nargs="+", metavar="PATH", help="validation documents (else --valid-every)")
    p.add_argument("--valid-every", type=int, default=None,
                   help="hold out every N-th document whole for validation (default 10; 0: no validation)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="'gpt2', a tokenizer.json, or a directory with one (default: gpt2 "
                                         "for --input; a trained BPE for --bundled)")
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the train split "
                                                    f"(--synthetic: content tokens, default {DEFAULT_VOCAB})")
    p.add_argument("--count", type=int, help="--bundled: only the newest COUNT speeches")
    p.add_argument("--shard-tokens", type=int, help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS}, "
                                                   f"--bundled {BUNDLED_SHARD_TOKENS})")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl files")
    p.add_argument("--skip-bad-documents", action="store_true",
                   help="leave out (and count) documents that are not UTF-8 instead of stopping")
    p.add_argument("--threads", type=int, default=0, help="tokenizer threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing or interrupted preparation")
    syn = p.add_argument_group("synthetic sources (--synthetic)")
    syn.add_argument("--synthetic-tokens", type=int, default=DEFAULT_TRAIN_TOKENS,
                     help="train tokens (valid: a tenth)")
    syn.add_argument("--synthetic-doc-tokens", type=int, default=DEFAULT_DOC_TOKENS, help="tokens per document")
    syn.add_argument("--synthetic-q", type=float, default=DEFAULT_Q, help="markov: probability of the 2nd successor")
    syn.add_argument("--seed", type=int, default=0, help="seed of the law and the documents")
    return p


def _report(prepared: PreparedData, out: Path) -> None:
    for split in ("train", "valid"):
        index = getattr(prepared, split)
        if index is not None:
            print(f"{split}: {index.docs} documents, {index.tokens} tokens in {len(index.shards)} shards "
                  f"-> {out / split}")
    stats = prepared.stats
    if stats.get("already_prepared"):
        print(f"{out} was already prepared (use --overwrite to redo it)")
    elif stats.get("tokens"):
        resumed = sum(v for k, v in stats.items() if k.endswith("resumed_docs"))
        print(f"tokenized {stats['tokens']} tokens in {stats['seconds']:.1f} s "
              f"({stats['tokens_per_s'] / 1e6:.2f} M tokens/s)" + (f"; resumed after {resumed} documents"
                                                                 if resumed else ""))
    if prepared.tokenizer_path is not None:
        print(f"tokenizer: {prepared.tokenizer_path}")
    print(f"tokenizer fingerprint: {prepared.train.tokenizer_fingerprint}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = Path(args.out_dir)
    valid_every = args.valid_every if args.valid_every is not None else (0 if args.valid_input else 10)
    try:
        if args.synthetic:
            prepared = _prepare_synthetic(args, out)
        elif args.bundled:
            prepared = prepare_bundled_corpus(
                out, vocab_size=args.vocab_size or 4096, tokenizer=args.tokenizer, count=args.count,
                valid_every=valid_every, shard_tokens=args.shard_tokens or BUNDLED_SHARD_TOKENS,
                overwrite=args.overwrite, num_threads=args.threads)
        else:
            prepared = _prepare_files(args, out, valid_every)
    except (OSError, ValueError) as err:
        print(f"calm-prepare-data: error: {err}", file=sys.stderr)
        return 1
    _report(prepared, out)
    if args.synthetic:
        print(report(prepared, out))
    return 0


def _prepare_synthetic(args: argparse.Namespace, out: Path) -> PreparedData:
    if args.tokenizer or args.valid_input:
        raise ValueError("--synthetic writes its own tokenizer and validation split: drop --tokenizer / --valid-input")
    vocab = DEFAULT_VOCAB if args.vocab_size is None else args.vocab_size
    return prepare_synthetic(out, args.synthetic, vocab=vocab, q=args.synthetic_q, seed=args.seed,
                             train_tokens=args.synthetic_tokens, doc_tokens=args.synthetic_doc_tokens,
                             shard_tokens=args.shard_tokens or BUNDLED_SHARD_TOKENS, overwrite=args.overwrite)


def _prepare_files(args: argparse.Namespace, out: Path, valid_every: int) -> PreparedData:
    skipped: list[str] = []

    def documents(paths):
        return iter_documents(paths, text_key=args.text_key, skip_bad=args.skip_bad_documents, skipped=skipped)

    tokenizer_path = None
    if args.vocab_size:
        tokenizer_path = out / TOKENIZER_FILE
        train_texts = (d.text for i, d in enumerate(documents(args.input))
                       if args.valid_input or not is_held_out(i, valid_every))
        tokenizer = _trained_tokenizer(tokenizer_path, train_texts, args.vocab_size, args.overwrite)
        skipped.clear()  # the shard pass reads (and counts) them again
    else:
        tokenizer = load_tokenizer(args.tokenizer or "gpt2")
    valid_docs = documents(args.valid_input) if args.valid_input else None
    prepared = prepare_shards(documents(args.input), tokenizer, out, valid_every=valid_every,
                              valid_documents=valid_docs, shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                              source=" ".join(args.input + (args.valid_input or [])), overwrite=args.overwrite,
                              num_threads=args.threads, skipped_documents=skipped)

    if skipped:
        print(f"skipped {len(skipped)} bad documents: {', '.join(skipped[:5])}" + (" ..." if len(skipped) > 5 else ""))
    prepared.tokenizer_path = tokenizer_path
    return prepared


if __name__ == "__main__":
    sys.exit(main())
