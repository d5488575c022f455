"""BrierLM evaluation of the token baseline: rollouts by tree forward against every path from scratch.

The baseline's Brier-n terms (CALM.md §3.3) need, for every start whose two sampled tokens agree,
the next-token distribution after the start's context plus the sampled continuation, up to three
times per block. `recomputed` runs each such path from scratch (the context again for every row);
`tree` runs only the sampled tokens, up to 128 continuations in one forward, attending to the keys
and values the teacher-forced forward recorded, each seeing only its own path
(calm_dist.models.scoring, calm_dist.models.shared_context), and scores BLOCKS_PER_FORWARD blocks
together: one teacher-forced forward and one rollout forward per step for all of them, as calm-eval
and the trainer's evaluation do. All score the same blocks with the same seeds; the figure is the
time per block of the whole score (teacher-forced forward + rollouts), the ratios measured in one
run (the tree block by block is printed beside it).

How much the rollouts cost depends on how often two draws agree, i.e. on sum_x p(x)^2 of the model's
next-token distributions: an untrained model's are nearly uniform (its draws almost never agree,
there is nothing to roll out). The model here has its output layer scaled until sum p^2 is about
0.3, the order of a trained small model's on real text; the measured value is printed.
"""

from __future__ import annotations

import time

import torch

from bench.common import build_baseline, job_config, time_interleaved
from bench.report import BenchResult, at_least
from calm_dist.evaluation.scorer import BLOCKS_PER_FORWARD
from calm_dist.models.scoring import (
    recomputed_next_token_probs,
    score_baseline_block,
    score_baseline_blocks,
    tree_next_token_probs,
)

NAME = "brier_eval"
TARGET = 3.0  # tree / recomputed speed at 64 context steps
OUTPUT_SCALE = 15.0  # makes the tiny model's mean sum p^2 about 0.3 (measured and printed)


def collision_rate(model, blocks_BT: torch.Tensor) -> float:
    """Mean sum_x p(x)^2 of the teacher-forced next-token distributions: how often two draws agree."""
    probs = torch.softmax(model.logits(blocks_BT[:, :-1]).float(), dim=-1)
    return float(probs.pow(2).sum(-1).mean())


def measure(model, blocks_BT: torch.Tensor, repeats: int) -> dict:
    """Time per block of scoring `blocks_BT` three ways, interleaved: every path from scratch block
    by block (`recomputed`, the code before), the tree rollouts block by block (`tree_1`), and the
    tree rollouts with BLOCKS_PER_FORWARD blocks per forward (`tree`, what calm-eval and the
    trainer's evaluation run)."""
    rows = {"tree": [], "tree_1": [], "recomputed": []}
    seeds = list(range(blocks_BT.shape[0]))

    def counted(factory, name):
        def counted_factory(model, blocks, context):
            inner = factory(model, blocks, context)

            def next_token_probs(in_block, starts_A, continuation_AJ):
                rows[name].append(starts_A.shape[0])
                return inner(in_block, starts_A, continuation_AJ)

            return next_token_probs

        return counted_factory

    def by_block(factory, name):
        def score_all():
            rows[name].clear()
            return [score_baseline_block(model, block, seed, rollout=counted(factory, name)).brier["all"]
                    for seed, block in zip(seeds, blocks_BT)]

        return score_all

    def together():
        rows["tree"].clear()
        scores = []
        for first in range(0, blocks_BT.shape[0], BLOCKS_PER_FORWARD):
            group = slice(first, first + BLOCKS_PER_FORWARD)
            scores += score_baseline_blocks(model, blocks_BT[group], seeds[group],
                                            rollout=counted(tree_next_token_probs, "tree"))
        return [score.brier["all"] for score in scores]

    fns = {"tree": together, "tree_1": by_block(tree_next_token_probs, "tree_1"),
           "recomputed": by_block(recomputed_next_token_probs, "recomputed")}
    seconds = time_interleaved(fns, repeats=repeats, warmup=1)
    terms = {name: fn() for name, fn in fns.items()}
    differences = max(float((a - b).abs().max()) for name in ("tree", "tree_1")
                      for a, b in zip(terms[name], terms["recomputed"]))
    blocks = blocks_BT.shape[0]
    return {
        "block_tokens": blocks_BT.shape[1], "blocks": blocks, "blocks_per_forward": BLOCKS_PER_FORWARD,
        "tree_ms_per_block": 1e3 * seconds["tree"] / blocks,
        "tree_1_ms_per_block": 1e3 * seconds["tree_1"] / blocks,
        "recomputed_ms_per_block": 1e3 * seconds["recomputed"] / blocks,
        "speedup": seconds["recomputed"] / seconds["tree"],
        "speedup_block_by_block": seconds["recomputed"] / seconds["tree_1"],
        "rollout_rows_per_block": sum(rows["tree_1"]) / blocks,
        "max_term_difference": differences,
    }


def run(quick: bool = False, contexts: list[int] | None = None, blocks: int | None = None) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    with torch.no_grad():
        contexts = contexts or ([64] if quick else [64, 256, 1024])
        longest = max(contexts) + 1
        cfg = job_config("tiny_baseline", [f"model.max_position_embeddings={max(longest, 256)}",
                                           f"data.seq_length={max(longest, 256)}"])
        model = build_baseline(cfg).eval()
        model.lm_head.weight.mul_(OUTPUT_SCALE)
        generator = torch.Generator().manual_seed(0)
        for context in contexts:
            count = blocks or (8 if context <= 256 else 2)
            blocks_BT = torch.randint(0, cfg.model.vocab_size - 1, (count, context + 1), generator=generator)
            m = measure(model, blocks_BT, repeats=2 if quick or context > 256 else 3)
            m["collision_rate"] = collision_rate(model, blocks_BT)
            result.details[f"context {context}"] = m
            name = (f"tiny baseline, {context} context steps: BrierLM per block, tree rollouts "
                    f"({BLOCKS_PER_FORWARD} blocks per forward) / recomputed")
            note = (f"{m['recomputed_ms_per_block']:.1f} -> {m['tree_ms_per_block']:.1f} ms per block "
                    f"({m['tree_1_ms_per_block']:.1f} block by block); "
                    f"{m['rollout_rows_per_block']:.0f} rollout rows per block; mean sum p^2 "
                    f"{m['collision_rate']:.2f}; terms equal to {m['max_term_difference']:.1e}")
            if context == 64:
                result.add(name, m["speedup"], "x", f">= {TARGET:g}x", at_least(m["speedup"], TARGET), note)
            else:
                result.add(name, m["speedup"], "x", "", None, note)
    result.seconds = time.perf_counter() - start
    return result
