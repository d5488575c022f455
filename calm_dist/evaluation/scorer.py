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
import torch.nn.functional as F

from calm_dist.evaluation.terms import baseline_next_token_probs, calm_block_terms, lockstep_next_token_probs
from calm_dist.ops.brier import BrierAccumulator, baseline_brier_terms, chunk_aligned_starts

MAX_N = 4  # Brier-1..4


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
        flat = torch.cat([torch.tensor([self.sums[n] for n in names], dtype=torch.float64),
                          *(self.brier[f].state() for f in families)]).to(device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        reduced = Tally()
        reduced.sums = dict(zip(names, flat[: len(names)].tolist()))
        width = 3 * MAX_N + 2
        for i, family in enumerate(families):
            start = len(names) + i * width
            reduced.brier[family] = BrierAccumulator.from_state(flat[start : start + width])
        return reduced

    def brier_summary(self, family: str) -> dict:
        """Brier-1..4 (raw means over positions), BrierLM (per-n clamp, x100; CALM.md §9.1), the
        standard error of each Brier-n across blocks, and the positions scored."""
        accumulator = self.brier[family]
        result = accumulator.result()
        result.pop("blocks")
        return {**result, "brier_stderr": accumulator.stderr()}


def _reconstruction(autoencoder, block_T: torch.Tensor, tally: Tally) -> None:
    chunks = block_T.reshape(1, -1, autoencoder.cfg.patch_size)
    tally.add("recon_sample", autoencoder.reconstruction_accuracy(chunks))
    tally.add("recon_mean", autoencoder.reconstruction_accuracy(chunks, use_mean=True))


@torch.no_grad()
def score_block(model, kind: str, block_T: torch.Tensor, seed: int, tally: Tally, *, lockstep: bool = False,
                reconstruction: bool = True) -> None:
    """Add one block's metrics to the tally; `seed` drives all of the block's randomness.
    `lockstep`: the baseline's rollouts run the same forwards on every rank (ZeRO-3).
    `reconstruction`: also score CALM's frozen autoencoder on the block (after everything else, so
    it never shifts the other figures' draws)."""
    seed_streams(seed, block_T.device)
    if kind == "calm":
        tally.add_brier("calm", calm_block_terms(model, block_T[None], max_n=MAX_N))
        tally.add("energy_loss", model(block_T[None]).loss)
        if reconstruction:
            _reconstruction(model.autoencoder, block_T, tally)
    elif kind == "baseline":
        logits_TV = model.logits(block_T[None, :-1])[0].float()
        tally.add("nll_sum", F.cross_entropy(logits_TV, block_T[1:], reduction="sum"))
        tally.add("nll_tokens", logits_TV.shape[0])
        generator = torch.Generator(device=block_T.device).manual_seed(seed)
        if lockstep:
            next_token_probs, top_up = lockstep_next_token_probs(model, calls=MAX_N - 1)
        else:
            next_token_probs, top_up = baseline_next_token_probs(model), None
        terms_SN = baseline_brier_terms(torch.softmax(logits_TV, dim=-1), block_T, next_token_probs, generator,
                                        max_n=MAX_N)
        if top_up is not None:
            top_up(block_T)
        tally.add_brier("all", terms_SN)
        # Start i is row i, so the aligned starts pick their rows from the same draws (§9.8).
        tally.add_brier("aligned", terms_SN[chunk_aligned_starts(block_T.shape[0], model.cfg.patch_size, MAX_N)])
    else:
        tally.add("ce", model(block_T.reshape(1, -1, model.cfg.patch_size)).ce)
        _reconstruction(model, block_T, tally)


@torch.no_grad()
def score_blocks(model, kind: str, blocks_BT: torch.Tensor, seed: int, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, lockstep: bool = False, reconstruction: bool = True) -> Tally:
    """Score this rank's blocks (dealt round robin: its i-th block is block rank + i * world_size of
    all) and return the tally reduced over every rank. The model is put in eval mode and back, and
    the caller's random streams are restored."""
    was_training = model.training
    model.eval()
    tally = Tally()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, block_T in enumerate(blocks_BT.to(device)):
            score_block(model, kind, block_T, block_seed(seed, rank + i * world_size), tally, lockstep=lockstep,
                        reconstruction=reconstruction)
    if was_training:
        model.train()
    return tally.reduce(device)


def metrics_from(kind: str, tally: Tally, blocks: int, block_tokens: int) -> tuple[dict, int]:
    """calm-eval's metrics and the number of positions scored (Brier positions for the language
    models, tokens for the autoencoder)."""
    sums = tally.sums
    if kind == "baseline":
        brier = tally.brier_summary("all")
        positions = brier.pop("positions")
        ce = sums["nll_sum"] / sums["nll_tokens"]
        return {**brier, "aligned": tally.brier_summary("aligned"), "ce": ce, "ppl": math.exp(ce)}, positions
    reconstruction = ({"sample": sums["recon_sample"] / blocks, "mean": sums["recon_mean"] / blocks}
                      if "recon_sample" in sums else None)
    if kind == "calm":
        brier = tally.brier_summary("calm")
        positions = brier.pop("positions")
        metrics = {**brier, "energy_loss": sums["energy_loss"] / blocks}
        if reconstruction is not None:
            metrics["reconstruction"] = reconstruction
        return metrics, positions
    return {"ce": sums["ce"] / blocks, "reconstruction": reconstruction}, blocks * block_tokens
