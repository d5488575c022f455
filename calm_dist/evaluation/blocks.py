"""Evaluation blocks for `calm-eval`: from a shard directory or raw text files, cut as the
trainer cuts them (CALM.md §9.7), with the context the protocol asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from calm_dist.config import rules
from calm_dist.data.corpus import iter_documents
from calm_dist.data.index import INDEX_NAME, check_tokenizer, id_mismatches, is_shard_url, load_index
from calm_dist.data.loader import read_eval_blocks
from calm_dist.data.packing import Packer, cut_blocks
from calm_dist.models.kinds import model_kind

PROTOCOL_CONTEXT_STEPS = 2048  # the reference's evaluation context, in model steps (CALM.md §3.3)


class EvalInputError(ValueError):
    """Bad input: the command exits 2 with this message."""


# Blocks -----------------------------------------------------------------------------------------

def context_steps_for(kind: str, model_cfg, requested: int | None) -> tuple[int, list[str]]:
    """The context in model steps, and notes for the report. The protocol's 2048 by default,
    capped at the model's position range; an explicit request beyond it is refused."""
    limit = None if model_kind(kind).reads_chunks else model_cfg.max_position_embeddings  # chunks: no positions
    if requested is not None:
        if requested < 1:
            raise EvalInputError(f"--context-steps must be >= 1, got {requested}")
        if limit is not None and requested > limit:
            raise EvalInputError(f"--context-steps {requested} exceeds the model's max_position_embeddings "
                                 f"({limit} steps): it never saw positions that far")
        return requested, []
    if limit is not None and limit < PROTOCOL_CONTEXT_STEPS:
        return limit, [f"context capped at the model's max_position_embeddings ({limit} steps), below the "
                       f"protocol's {PROTOCOL_CONTEXT_STEPS}: numbers are not comparable with the paper's"]
    return PROTOCOL_CONTEXT_STEPS, []


def block_tokens_for_eval(kind: str, context_steps: int, patch_size: int) -> int:
    """Context + the target step, as in training (CALM.md §9.7): (S + 1) * K tokens for CALM,
    S + 1 for the baseline, S * K for the autoencoder (no target step)."""
    return rules.block_tokens(kind, rules.context_tokens(kind, context_steps, patch_size), patch_size)


def _is_shard_directory(paths: list[str]) -> bool:
    if len(paths) != 1:
        return False
    path = paths[0]
    return is_shard_url(path) or (Path(path) / INDEX_NAME).is_file() or Path(path).name == INDEX_NAME


def _check_ids(source: str, vocab_size: int, bos: int, eos: int, pad: int, model_cfg) -> None:
    """Token ids from `source` (shards or the tokenizer) must mean what they meant in training."""
    wrong = [f"{name} {theirs} (model {mine})" for name, theirs, mine in id_mismatches(vocab_size, bos, eos, pad, model_cfg)]
    if wrong:
        raise EvalInputError(f"{source} does not fit the model: {', '.join(wrong)}")


def _shard_blocks(path: str, packer, tokenizer, model_cfg, block_tokens: int, max_blocks: int | None) -> torch.Tensor:
    index = load_index(path)
    if tokenizer is not None:
        check_tokenizer(index, tokenizer)  # TokenizerMismatchError names both tokenizers
    _check_ids(f"shards in {index.directory}", index.vocab_size, index.bos_id, index.eos_id, index.pad_id, model_cfg)
    try:
        return read_eval_blocks(index, block_tokens, max_blocks, packing=packer.mode, patch_size=packer.patch_size)
    except ValueError as err:
        raise EvalInputError(f"too little data for one block: {err}; lower --context-steps") from None


def _text_blocks(paths: list[str], packer, tokenizer, model_cfg, block_tokens: int,
                 max_blocks: int | None) -> torch.Tensor:
    """Raw documents tokenized here, then packed and cut exactly as shards would be."""
    if tokenizer is None:
        raise EvalInputError("the model's tokenizer cannot be loaded (its config's data.tokenizer), so raw text "
                             "cannot be tokenized: pass a shard directory prepared with that tokenizer")
    _check_ids(f"tokenizer {tokenizer.name!r}", tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
               tokenizer.pad_id, model_cfg)
    texts = [doc.text for doc in iter_documents(paths) if doc.text.strip()]  # empty ones skipped, as prepare does
    packed = (((0, 0), packer.pack(np.asarray(ids, dtype=np.int64))) for ids in tokenizer.encode_batch(texts))
    blocks = []
    for block, _ in cut_blocks(packed, block_tokens):
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
        blocks.append(block)
    if not blocks:
        raise EvalInputError(f"too little data for one block of {block_tokens} tokens in {', '.join(paths)}: "
                             "give more text or lower --context-steps")
    return torch.from_numpy(np.stack(blocks))


def load_blocks(paths: list[str], kind: str, tokenizer, model_cfg, patch_size: int, block_tokens: int,
                max_blocks: int | None) -> torch.Tensor:
    """All evaluation blocks, LongTensor (n, block_tokens): documents as BOS + doc + EOS,
    concatenated and cut (CALM.md §9.7), from a shard directory or raw text files."""
    # The autoencoder reads documents padded to whole chunks, as in its training (CALM.md §1.3).
    packer = Packer(rules.PACKING_FOR_EVALUATION[kind], model_cfg.bos_token_id, model_cfg.eos_token_id, model_cfg.pad_token_id, patch_size)
    packer.check_block(block_tokens)
    if _is_shard_directory(paths):
        return _shard_blocks(paths[0], packer, tokenizer, model_cfg, block_tokens, max_blocks)
    return _text_blocks(paths, packer, tokenizer, model_cfg, block_tokens, max_blocks)


