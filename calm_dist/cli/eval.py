"""Evaluate a trained model on held-out text: BrierLM for CALM and the token baseline, cross-entropy
and perplexity for the baseline, reconstruction accuracy for an autoencoder (CALM.md §3, §9.1, §9.7,
§9.8).

    calm-eval runs/tiny/calm --data data/valid --out report.json
    calm-eval converted/calm-m --data wiki.test.jsonl --context-steps 2048
    torchrun --nproc_per_node 8 -m calm_dist.cli.eval MODEL --data data/valid --out report.json

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
import sys
import time
from pathlib import Path

from calm_dist.common.atomic import atomic_write_json
from calm_dist.common.dist_env import read_dist_env, resolve_device
from calm_dist.evaluation.blocks import (
    PROTOCOL_CONTEXT_STEPS,
    EvalInputError,
    block_tokens_for_eval,
    context_steps_for,
    load_blocks,
)
from calm_dist.evaluation.in_training import rank_slice
from calm_dist.evaluation.scorer import metrics_from, score_blocks
from calm_dist.parallel.launch import init_distributed, shutdown_distributed
from calm_dist.pretrained import load_pretrained

REPORT_FORMAT = "calm-dist-eval"
REPORT_VERSION = 1


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
    parser.add_argument("--blocks-per-forward", type=int, default=None,
                        help="blocks the token baseline scores in one forward (its BrierLM rollouts too); the "
                             "figures do not depend on it beyond float rounding (default: the model's "
                             "training.micro_batch_size, as its training's evaluation did)")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda")
    return parser


class EvalInputs:
    """What one rank evaluates, resolved from the command line before any compute."""

    def __init__(self, args: argparse.Namespace):
        env = read_dist_env()  # torchrun's variables, or SLURM's under a plain srun
        self.world, self.rank = env.world_size, 0
        self.device = resolve_device(args.device, env)
        if self.world > 1:
            info = init_distributed("cuda" if self.device.type == "cuda" else "cpu")
            self.rank, self.world = info.rank, info.world_size
        if args.max_blocks is not None and args.max_blocks < 1:
            raise EvalInputError(f"--max-blocks must be >= 1, got {args.max_blocks}")
        if args.blocks_per_forward is not None and args.blocks_per_forward < 1:
            raise EvalInputError(f"--blocks-per-forward must be >= 1, got {args.blocks_per_forward}")
        if not Path(args.model).exists():
            raise EvalInputError(f"{args.model}: no such model (give a training run, checkpoint or converted "
                                 "directory)")
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation talks; stdout is the report's
            self.pretrained = pre = load_pretrained(args.model, device=self.device)
        self.kind = pre.kind
        self.blocks_per_forward = args.blocks_per_forward or pre.config.training.micro_batch_size
        # Vocabulary and special ids live in the job's model section for every stage.
        ids_cfg = pre.config.model
        # Validation holds model.patch_size equal to the autoencoder's, and at least MAX_N for CALM
        # (Brier-n for n > K would need rollouts).
        patch_size = ids_cfg.patch_size
        self.context_steps, self.notes = context_steps_for(pre.kind, ids_cfg, args.context_steps)
        self.block_tokens = block_tokens_for_eval(pre.kind, self.context_steps, patch_size)
        blocks = load_blocks(args.data, pre.kind, pre.tokenizer, ids_cfg, patch_size, self.block_tokens,
                             args.max_blocks)
        try:
            self.blocks = rank_slice(blocks, self.rank, self.world)
        except ValueError as err:
            raise EvalInputError(str(err)) from None


def evaluate(inputs: EvalInputs, seed: int) -> tuple[dict, int, float]:
    """(metrics, positions scored, seconds) over every rank's blocks."""
    start = time.perf_counter()
    # Each rank holds the whole model, so the baseline's rollouts need no lockstep.
    tally = score_blocks(inputs.pretrained.model, inputs.kind, inputs.blocks, seed, inputs.device, rank=inputs.rank,
                         world_size=inputs.world, blocks_per_forward=inputs.blocks_per_forward)
    seconds = time.perf_counter() - start
    metrics, positions = metrics_from(inputs.kind, tally, inputs.blocks.shape[0] * inputs.world, inputs.block_tokens)
    return metrics, positions, seconds


def build_report(args: argparse.Namespace, inputs: EvalInputs, metrics: dict, positions: int, seconds: float) -> dict:
    blocks = inputs.blocks.shape[0] * inputs.world
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "kind": inputs.kind,
        "model": str(args.model), "data": [str(p) for p in args.data],
        "context_steps": inputs.context_steps, "block_tokens": inputs.block_tokens, "max_blocks": args.max_blocks,
        "seed": args.seed, "world_size": inputs.world, "device": inputs.device.type,
        "blocks_per_forward": inputs.blocks_per_forward,
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
        if read_dist_env().world_size > 1:  # only the process group this command started
            shutdown_distributed(clean=False)
        return 2
    metrics, positions, seconds = evaluate(inputs, args.seed)
    report = build_report(args, inputs, metrics, positions, seconds)
    if inputs.world > 1:  # only the process group this command started
        shutdown_distributed(clean=True)
    if inputs.rank == 0:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.out, report)
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
