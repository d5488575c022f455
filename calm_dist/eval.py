"""Evaluate a trained model on held-out text: BrierLM for CALM and the token baseline, cross-entropy
and perplexity for the baseline, reconstruction accuracy for an autoencoder (CALM.md §3, §9.1, §9.7,
§9.8).

    python -m calm_dist.eval runs/tiny/calm --data data/valid --out report.json
    python -m calm_dist.eval converted/calm-m --data wiki.test.jsonl --context-steps 2048
    torchrun --nproc_per_node 8 -m calm_dist.eval MODEL --data data/valid --out report.json

MODEL is anything `load_pretrained` accepts (a training run, its checkpoints, one checkpoint, a
converted directory). --data is a shard directory (with index.json) or text/markdown/JSON-lines
files or directories of them, tokenized with the model's tokenizer. Documents are concatenated as
BOS + doc + EOS and cut into blocks of context + one target step, the remainder dropped: CALM reads
context_steps chunks ((context_steps + 1) * K tokens a block), the baseline context_steps tokens.

Under torchrun each rank scores an equal slice of the blocks and the sums are reduced once at the
end; rank 0 writes the report. Each rank holds the whole model (load_pretrained consolidates it),
so forwards need no lockstep: the only collective is that reduction, which every rank reaches
after the same number of blocks. The randomness of block i (head samples, rollout draws) is seeded
from (--seed, i), so the numbers do not depend on the world size.

The report (JSON; stdout, and --out on rank 0): format, version, kind, model, data, context_steps,
block_tokens, max_blocks, seed, world_size, device, blocks, positions, metrics, notes, seconds
(scoring and reduction; loading excluded), blocks_per_s, tokens_per_s. `positions` counts the
Brier positions scored (CALM: chunk positions; baseline: every start with a whole 4-gram after it;
autoencoder: tokens). `metrics`:
  calm         brier1..4, brierlm, brier_stderr (per n, across blocks), energy_loss,
               reconstruction {sample, mean} of its frozen autoencoder
  baseline     the same Brier keys over every start, aligned {the same over chunk-aligned starts
               only, positions}, ce (nats per token), ppl
  autoencoder  ce, reconstruction {sample, mean}: token accuracy decoding a posterior sample and
               the posterior mean
Brier-n are the raw means (negative values kept); BrierLM clamps each at 0 first (CALM.md §9.1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from calm_dist.metrics.brier import baseline_brier_terms, brierlm_from_means, chunk_aligned_starts
from calm_dist.metrics.model_brier import baseline_next_token_probs, calm_block_terms

REPORT_FORMAT = "calm-dist-eval"
REPORT_VERSION = 1
PROTOCOL_CONTEXT_STEPS = 2048  # the reference's evaluation context, in model steps (CALM.md §3.3)
MAX_N = 4  # Brier-1..4


class EvalInputError(ValueError):
    """Bad input: the command exits 2 with this message."""


# Blocks -----------------------------------------------------------------------------------------

def context_steps_for(kind: str, model_cfg, requested: int | None) -> tuple[int, list[str]]:
    """The context in model steps, and notes for the report. The protocol's 2048 by default,
    capped at the model's position range; an explicit request beyond it is refused."""
    limit = model_cfg.max_position_embeddings if kind != "autoencoder" else None
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
    """Context + one target step: (S + 1) * K tokens for CALM and the autoencoder, S + 1 for the
    baseline (CALM.md §9.7)."""
    from calm_dist.data.packing import block_tokens_for

    seq_length = context_steps if kind == "baseline" else context_steps * patch_size
    return block_tokens_for(kind, seq_length, patch_size)


def _is_shard_directory(paths: list[str]) -> bool:
    from calm_dist.data.index import INDEX_NAME, is_shard_url

    if len(paths) != 1:
        return False
    path = paths[0]
    return is_shard_url(path) or (Path(path) / INDEX_NAME).is_file() or Path(path).name == INDEX_NAME


def _check_ids(source: str, vocab_size: int, bos: int, eos: int, pad: int, model_cfg) -> None:
    """Token ids from `source` (shards or the tokenizer) must mean what they meant in training."""
    pairs = {"vocab_size": (vocab_size, model_cfg.vocab_size), "bos_id": (bos, model_cfg.bos_token_id),
             "eos_id": (eos, model_cfg.eos_token_id), "pad_id": (pad, model_cfg.pad_token_id)}
    wrong = [f"{name} {theirs} (model {mine})" for name, (theirs, mine) in pairs.items() if theirs != mine]
    if wrong:
        raise EvalInputError(f"{source} does not fit the model: {', '.join(wrong)}")


def _shard_blocks(path: str, packer, tokenizer, model_cfg, block_tokens: int, max_blocks: int | None) -> torch.Tensor:
    from calm_dist.data.index import check_tokenizer, load_index
    from calm_dist.data.loader import read_eval_blocks

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
    from calm_dist.data.corpus import iter_documents
    from calm_dist.data.packing import cut_blocks

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
    from calm_dist.data.packing import Packer

    # The autoencoder reads documents padded to whole chunks, as in its training (CALM.md §1.3).
    packing = "ae" if kind == "autoencoder" else "eval"
    packer = Packer(packing, model_cfg.bos_token_id, model_cfg.eos_token_id, model_cfg.pad_token_id, patch_size)
    packer.check_block(block_tokens)
    if _is_shard_directory(paths):
        return _shard_blocks(paths[0], packer, tokenizer, model_cfg, block_tokens, max_blocks)
    return _text_blocks(paths, packer, tokenizer, model_cfg, block_tokens, max_blocks)


def block_seed(seed: int, block_index: int) -> int:
    """Independent, reproducible randomness per (seed, block), whatever rank scores the block."""
    return int(np.random.SeedSequence([seed, block_index]).generate_state(1)[0])


# Sums over blocks -------------------------------------------------------------------------------

class Tally:
    """Named sums over blocks, reduced across ranks in one all_reduce. Every rank adds the same
    names (same kind, same number of blocks), so their sorted order lines the tensors up."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def add_brier(self, family: str, terms_SN: torch.Tensor) -> None:
        """Position sums, for the means, and squared block means, for the spread across blocks."""
        block_means = terms_SN.double().mean(dim=0)
        for n in range(terms_SN.shape[1]):
            self.add(f"{family}.sum{n + 1}", terms_SN[:, n].double().sum())
            self.add(f"{family}.block_sq{n + 1}", block_means[n] ** 2)
            self.add(f"{family}.block_sum{n + 1}", block_means[n])
        self.add(f"{family}.positions", terms_SN.shape[0])

    def reduced(self, device: torch.device) -> dict[str, float]:
        names = sorted(self.sums)
        values = torch.tensor([self.sums[name] for name in names], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        return dict(zip(names, values.tolist()))


def brier_summary(sums: dict[str, float], family: str, blocks: int) -> dict:
    """Brier-1..4 (raw means over positions), BrierLM (per-n clamp, x100; CALM.md §9.1), the
    standard error of each Brier-n across blocks, and the positions scored."""
    positions = int(sums[f"{family}.positions"])
    means = [sums[f"{family}.sum{n}"] / positions for n in range(1, MAX_N + 1)]
    stderr = []
    for n in range(1, MAX_N + 1):
        if blocks < 2:
            stderr.append(None)
            continue
        mean = sums[f"{family}.block_sum{n}"] / blocks
        variance = max(sums[f"{family}.block_sq{n}"] / blocks - mean**2, 0.0) * blocks / (blocks - 1)
        stderr.append(math.sqrt(variance / blocks))
    return {**{f"brier{n + 1}": m for n, m in enumerate(means)}, "brierlm": brierlm_from_means(means),
            "brier_stderr": stderr, "positions": positions}


# Per-block scoring ------------------------------------------------------------------------------

def _reconstruction(autoencoder, block_T: torch.Tensor, tally: Tally) -> None:
    chunks = block_T.reshape(1, -1, autoencoder.cfg.patch_size)
    tally.add("recon_sample", autoencoder.reconstruction_accuracy(chunks))
    tally.add("recon_mean", autoencoder.reconstruction_accuracy(chunks, use_mean=True))


@torch.no_grad()
def score_block(model, kind: str, block_T: torch.Tensor, seed: int, tally: Tally) -> None:
    """Add one block's metrics to the tally. `seed` drives all of the block's randomness."""
    device = block_T.device
    torch.manual_seed(seed)
    if kind == "calm":
        tally.add_brier("calm", calm_block_terms(model, block_T[None], max_n=MAX_N))
        tally.add("energy_loss", model(block_T[None]).loss)
        _reconstruction(model.autoencoder, block_T, tally)
    elif kind == "baseline":
        logits_TV = model.logits(block_T[None, :-1])[0].float()
        tally.add("nll_sum", F.cross_entropy(logits_TV, block_T[1:], reduction="sum"))
        tally.add("nll_tokens", logits_TV.shape[0])
        generator = torch.Generator(device=device).manual_seed(seed)
        terms_SN = baseline_brier_terms(torch.softmax(logits_TV, dim=-1), block_T, baseline_next_token_probs(model),
                                        generator, max_n=MAX_N)
        tally.add_brier("all", terms_SN)
        # Start i is row i, so the aligned starts pick their rows from the same draws (§9.8).
        tally.add_brier("aligned", terms_SN[chunk_aligned_starts(block_T.shape[0], model.cfg.patch_size, MAX_N)])
    else:
        chunks = block_T.reshape(1, -1, model.cfg.patch_size)
        tally.add("ce", model(chunks).ce)
        _reconstruction(model, block_T, tally)


def metrics_from(kind: str, sums: dict[str, float], blocks: int, block_tokens: int) -> tuple[dict, int]:
    """The report's metrics and the number of positions scored (Brier positions for the language
    models, tokens for the autoencoder)."""
    if kind == "baseline":
        brier = brier_summary(sums, "all", blocks)
        positions = brier.pop("positions")
        ce = sums["nll_sum"] / sums["nll_tokens"]
        return {**brier, "aligned": brier_summary(sums, "aligned", blocks), "ce": ce, "ppl": math.exp(ce)}, positions
    reconstruction = {"sample": sums["recon_sample"] / blocks, "mean": sums["recon_mean"] / blocks}
    if kind == "calm":
        brier = brier_summary(sums, "calm", blocks)
        positions = brier.pop("positions")
        return {**brier, "energy_loss": sums["energy_loss"] / blocks, "reconstruction": reconstruction}, positions
    return {"ce": sums["ce"] / blocks, "reconstruction": reconstruction}, blocks * block_tokens


# Command line -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a training run, checkpoint, or converted directory")
    parser.add_argument("--data", nargs="+", required=True,
                        help="a shard directory (index.json), or .txt/.md/.jsonl files or directories of them")
    parser.add_argument("--context-steps", type=int, default=None,
                        help=f"context in model steps (chunks for CALM, tokens for the baseline); default "
                             f"{PROTOCOL_CONTEXT_STEPS}, capped at the model's max_position_embeddings")
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate at most this many blocks")
    parser.add_argument("--out", default=None, help="write the JSON report here (rank 0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds each block's sampling")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda")
    return parser


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class EvalInputs:
    """What one rank evaluates, resolved from the command line before any compute."""

    def __init__(self, args: argparse.Namespace):
        from calm_dist.pretrained import load_pretrained
        from calm_dist.training.evaluate import rank_slice

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = _device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1:
            from calm_dist.parallel.launch import init_distributed

            info = init_distributed("cuda" if self.device.type == "cuda" else "cpu")
            self.rank, self.world = info.rank, info.world_size
        if args.max_blocks is not None and args.max_blocks < 1:
            raise EvalInputError(f"--max-blocks must be >= 1, got {args.max_blocks}")
        if not Path(args.model).exists():
            raise EvalInputError(f"{args.model}: no such model (give a training run, checkpoint or converted "
                                 "directory)")
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation talks; stdout is the report's
            self.pretrained = pre = load_pretrained(args.model, device=self.device)
        self.kind = pre.kind
        # Vocabulary and special ids live in the job's model section for every stage.
        ids_cfg = pre.config.model
        patch_size = pre.config.autoencoder.patch_size if pre.kind == "autoencoder" else ids_cfg.patch_size
        if pre.kind == "calm" and patch_size < MAX_N:
            raise EvalInputError(f"CALM with K={patch_size} < {MAX_N}: Brier-n for n > K needs rollouts, which are "
                                 "not implemented")
        self.context_steps, self.notes = context_steps_for(pre.kind, ids_cfg, args.context_steps)
        self.block_tokens = block_tokens_for_eval(pre.kind, self.context_steps, patch_size)
        blocks = load_blocks(args.data, pre.kind, pre.tokenizer, ids_cfg, patch_size, self.block_tokens,
                             args.max_blocks)
        try:
            self.blocks = rank_slice(blocks, self.rank, self.world)
        except ValueError as err:
            raise EvalInputError(str(err)) from None

    def global_index(self, i: int) -> int:
        """The index among all blocks of this rank's i-th block (rank_slice deals them round robin)."""
        return self.rank + i * self.world


def evaluate(inputs: EvalInputs, seed: int) -> tuple[dict, int, float]:
    """(metrics, positions scored, seconds) over every rank's blocks."""
    start = time.perf_counter()
    tally = Tally()
    model = inputs.pretrained.model
    for i, block in enumerate(inputs.blocks.to(inputs.device)):
        score_block(model, inputs.kind, block, block_seed(seed, inputs.global_index(i)), tally)
    sums = tally.reduced(inputs.device)
    seconds = time.perf_counter() - start
    metrics, positions = metrics_from(inputs.kind, sums, inputs.blocks.shape[0] * inputs.world, inputs.block_tokens)
    return metrics, positions, seconds


def build_report(args: argparse.Namespace, inputs: EvalInputs, metrics: dict, positions: int, seconds: float) -> dict:
    blocks = inputs.blocks.shape[0] * inputs.world
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "kind": inputs.kind,
        "model": str(args.model), "data": [str(p) for p in args.data],
        "context_steps": inputs.context_steps, "block_tokens": inputs.block_tokens, "max_blocks": args.max_blocks,
        "seed": args.seed, "world_size": inputs.world, "device": inputs.device.type,
        "blocks": blocks, "positions": positions, "metrics": metrics, "notes": inputs.notes,
        "seconds": seconds, "blocks_per_s": blocks / max(seconds, 1e-9),
        "tokens_per_s": blocks * inputs.block_tokens / max(seconds, 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        inputs = EvalInputs(args)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
        # Bad input fails alike on every rank, before the one collective.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"calm-eval: error: {message}", file=sys.stderr)
        return 2
    metrics, positions, seconds = evaluate(inputs, args.seed)
    report = build_report(args, inputs, metrics, positions, seconds)
    if dist.is_initialized() and inputs.world > 1:
        dist.destroy_process_group()
    if inputs.rank == 0:
        if args.out:
            from calm_dist.data.atomic import atomic_write_json

            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.out, report)
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
