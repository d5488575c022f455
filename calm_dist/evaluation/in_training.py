"""The trainer's periodic evaluation on held-out blocks, through the same scorer as `calm-eval`.

Each data-parallel replica scores its slice of the blocks (`rank_slice`) and the sums are reduced,
so every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively: an
uneven count would hang). Evaluation draws from its own seeded streams and puts the training
streams back, so how often a run evaluates never changes the run itself, and every evaluation of
the same weights gives the same figures, equal to `calm-eval --seed <training.seed>` on the same
blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.config.schema import JobConfig
from calm_dist.evaluation.scorer import score_blocks, seed_streams
from calm_dist.models.calm import unconditional_energy
from calm_dist.models.kinds import CALM_KIND, model_kind

BRIER_KEYS = ("brier1", "brier2", "brier3", "brier4", "brierlm")


def rank_slice(blocks_BT: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's blocks, dealt round robin; the remainder that does not divide the world is dropped."""
    usable = blocks_BT.shape[0] // world_size * world_size
    if usable == 0:
        raise ValueError(f"{blocks_BT.shape[0]} evaluation blocks cannot be shared by {world_size} ranks")
    return blocks_BT[:usable][rank::world_size]


@torch.no_grad()
def evaluate(model, cfg: JobConfig, blocks_BT: torch.Tensor, device: torch.device, *, rank: int = 0,
             world_size: int = 1, level_blocks_BT: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out metrics for the stage: reconstruction for the autoencoder, energy loss, the
    unconditional level and BrierLM for CALM, cross-entropy, perplexity and BrierLM for the baseline.
    `blocks_BT` is this replica's slice (`rank_slice(all, rank, world_size)`). CALM's unconditional
    level is measured on `level_blocks_BT` (default: this rank's blocks), the same on every rank."""
    spec = model_kind(cfg.training.stage)
    lockstep = dist.is_initialized() and dist.get_world_size() > 1
    tally = score_blocks(model, spec.name, blocks_BT, cfg.training.seed, device, rank=rank, world_size=world_size,
                         lockstep=lockstep, reconstruction=False, blocks_per_forward=cfg.training.micro_batch_size)
    blocks = blocks_BT.shape[0] * world_size
    loss = tally.sums["loss"] / tally.sums["loss_weight"]
    metrics = {spec.eval_log_loss: loss, "blocks": blocks}
    if "recon_sample" in tally.sums:
        metrics["recon_acc"] = tally.sums["recon_sample"] / blocks
    if spec.brier_family is not None:
        brier = tally.brier[spec.brier_family].result()
        metrics.update({k: brier[k] for k in BRIER_KEYS})
    if spec.perplexity:
        metrics["ppl"] = float(torch.tensor(loss).exp())
    if spec is CALM_KIND:
        # The level a CALM that ignores its context reaches (the collapse alarm): computed on the same
        # blocks by every rank, so it is not summed over ranks.
        metrics["uncond"] = unconditional_level(model, cfg.training.seed,
                                                blocks_BT if level_blocks_BT is None else level_blocks_BT, device)
        metrics["gap_pct"] = 100 * (metrics["uncond"] - metrics["loss"]) / metrics["uncond"]
    return metrics


@torch.no_grad()
def unconditional_level(model, seed: int, blocks_BT: torch.Tensor, device: torch.device) -> float:
    """CALM's energy against the marginal of the next vector, from its own seeded streams."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_streams(seed, device)
        level = unconditional_energy(model, blocks_BT.to(device))
    if was_training:
        model.train()
    return level
