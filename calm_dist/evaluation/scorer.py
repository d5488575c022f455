"""The one block scorer: the trainer's periodic evaluation, `calm-eval` and the quickstart's summary
all score evaluation blocks here, so they agree on the same checkpoint and blocks.

Each block's randomness (CALM's head samples, the baseline's rollout draws) is seeded from
(seed, the block's index among all blocks), whatever rank scores it, so the numbers depend neither
on the world size nor on how often a run evaluates; the caller's random streams are put back
afterwards. Sums over blocks are reduced across ranks in one all_reduce.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from calm_dist.evaluation.lockstep import LockstepRollouts
from calm_dist.models.kinds import model_kind
from calm_dist.models.scoring import MAX_N
from calm_dist.ops.brier import BrierAccumulator

# Blocks the baseline scores in one teacher-forced forward (and its rollouts) unless told: more is
# faster while the (blocks, tokens, vocabulary) logits fit. The trainer's evaluation and calm-eval
# take the run's training.micro_batch_size (calm-eval --blocks-per-forward).
BLOCKS_PER_FORWARD = 8


def block_seed(seed: int, block_index: int) -> int:
    """Independent, reproducible randomness per (seed, block), whatever rank scores the block."""
    return int(np.random.SeedSequence([seed, block_index]).generate_state(1)[0])


def seed_streams(seed: int, device: torch.device) -> None:
    """Seed the streams evaluation draws from: the CPU's and this rank's device only (callers run
    inside a fork_rng that puts them back)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device only, unlike torch.manual_seed


class Tally:
    """Named scalar sums and Brier accumulators over blocks, reduced across ranks in one
    all_reduce. Every rank adds the same names (same kind, same number of blocks), so their sorted
    order lines the tensors up."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.brier: dict[str, BrierAccumulator] = {}

    def add(self, name: str, value) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def add_brier(self, family: str, terms_SN: torch.Tensor) -> None:
        self.brier.setdefault(family, BrierAccumulator(MAX_N)).update(terms_SN)

    def reduce(self, device: torch.device) -> Tally:
        """The sums over every rank (this tally when there is one process)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self
        names, families = sorted(self.sums), sorted(self.brier)
        parts = [torch.tensor([self.sums[n] for n in names], dtype=torch.float64),
                 *(self.brier[f].state() for f in families)]
        flat = torch.cat(parts).to(device)
        dist.all_reduce(flat)
        reduced_parts = flat.cpu().split([part.numel() for part in parts])
        reduced = Tally()
        reduced.sums = dict(zip(names, reduced_parts[0].tolist()))
        reduced.brier = {f: BrierAccumulator.from_state(state) for f, state in zip(families, reduced_parts[1:])}
        return reduced

    def brier_summary(self, family: str) -> dict:
        """Brier-1..4 (raw means over positions), BrierLM (per-n clamp, x100; CALM.md §9.1), the
        standard error of each Brier-n across blocks, and the positions scored."""
        accumulator = self.brier[family]
        result = accumulator.result()
        result.pop("blocks")
        return {**result, "brier_stderr": accumulator.stderr()}


@torch.no_grad()
def score_block(model, kind: str, block_T: torch.Tensor, seed: int, tally: Tally, *, lockstep: bool = False,
                reconstruction: bool = True) -> None:
    """Add one block's figures (`calm_dist.models.scoring`) to the tally; `seed` drives all of the
    block's randomness. `lockstep`: the baseline's rollouts run the same forwards on every rank
    (ZeRO-3). `reconstruction`: also score CALM's frozen autoencoder on the block."""
    seed_streams(seed, block_T.device)
    rollout = LockstepRollouts(calls=MAX_N - 1) if lockstep else None
    score = model_kind(kind).score_block(model, block_T, seed, reconstruction=reconstruction, rollout=rollout)
    if rollout is not None:
        rollout.top_up(block_T[None])
    _add(tally, score)


@torch.no_grad()
def score_batch(model, kind: str, blocks_BT: torch.Tensor, seeds: list[int], tally: Tally, *,
                lockstep: bool = False) -> None:
    """Add the figures of several blocks scored together (a kind with `score_batch`): the same as
    `score_block` on each with its seed, in fewer, larger forwards."""
    seed_streams(seeds[0], blocks_BT.device)  # (the baseline draws only from its per-block generators)
    rollout = LockstepRollouts(calls=MAX_N - 1) if lockstep else None
    scores = model_kind(kind).score_batch(model, blocks_BT, seeds, rollout=rollout)
    if rollout is not None:
        rollout.top_up(blocks_BT)
    for score in scores:
        _add(tally, score)


def _add(tally: Tally, score) -> None:
    tally.add("loss", score.loss)
    tally.add("loss_weight", score.loss_weight)
    for name, value in score.scalars.items():
        tally.add(name, value)
    for family, terms_SN in score.brier.items():
        tally.add_brier(family, terms_SN)


@torch.no_grad()
def score_blocks(model, kind: str, blocks_BT: torch.Tensor, seed: int, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, lockstep: bool = False, reconstruction: bool = True,
                 blocks_per_forward: int = BLOCKS_PER_FORWARD) -> Tally:
    """Score this rank's blocks (dealt round robin: its i-th block is block rank + i * world_size of
    all) and return the tally reduced over every rank. A kind that scores blocks together (the
    baseline) takes up to `blocks_per_forward` at a time; its figures do not depend on how many.
    The model is put in eval mode and back, and the caller's random streams are restored."""
    if blocks_per_forward < 1:
        raise ValueError(f"blocks_per_forward must be >= 1, got {blocks_per_forward}")
    spec = model_kind(kind)
    was_training = model.training
    model.eval()
    tally = Tally()
    seeds = [block_seed(seed, rank + i * world_size) for i in range(blocks_BT.shape[0])]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        blocks_BT = blocks_BT.to(device)
        if spec.score_batch is not None:
            for first in range(0, blocks_BT.shape[0], blocks_per_forward):
                group = slice(first, first + blocks_per_forward)
                score_batch(model, kind, blocks_BT[group], seeds[group], tally, lockstep=lockstep)
        else:
            for block_T, block_seed_ in zip(blocks_BT, seeds):
                score_block(model, kind, block_T, block_seed_, tally, lockstep=lockstep, reconstruction=reconstruction)
    if was_training:
        model.train()
    return tally.reduce(device)


def metrics_from(kind: str, tally: Tally, blocks: int, block_tokens: int) -> tuple[dict, int]:
    """calm-eval's metrics and the number of positions scored (Brier positions for the language
    models, tokens for the autoencoder)."""
    spec, sums = model_kind(kind), tally.sums
    loss = sums["loss"] / sums["loss_weight"]
    metrics, positions = {}, blocks * block_tokens
    if spec.brier_family is not None:
        metrics = tally.brier_summary(spec.brier_family)
        positions = metrics.pop("positions")
        for family in sorted(set(tally.brier) - {spec.brier_family}):
            metrics[family] = tally.brier_summary(family)  # e.g. the baseline's chunk-aligned starts
    metrics[spec.loss_name] = loss
    if spec.perplexity:
        metrics["ppl"] = math.exp(loss)
    if "recon_sample" in sums:
        metrics["reconstruction"] = {"sample": sums["recon_sample"] / blocks, "mean": sums["recon_mean"] / blocks}
    return metrics, positions
