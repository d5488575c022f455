"""Periodic evaluation on held-out blocks, distributed: each rank scores an equal slice of the
blocks and the sums are reduced, so every rank runs the same number of forward passes (ZeRO-3
gathers parameters collectively: an uneven count would hang)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.config.schema import JobConfig
from calm_dist.metrics.brier import BrierAccumulator, baseline_brier_terms
from calm_dist.metrics.model_brier import baseline_next_token_probs, calm_block_terms
from calm_dist.models.calm import unconditional_energy


def rank_slice(blocks_BT: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's blocks; the remainder that does not divide the world is dropped."""
    usable = blocks_BT.shape[0] // world_size * world_size
    if usable == 0:
        raise ValueError(f"{blocks_BT.shape[0]} evaluation blocks cannot be shared by {world_size} ranks")
    return blocks_BT[:usable][rank::world_size]


def _fixed_call_count(model, calls: int):
    """A `next_token_probs` that runs the same number of forwards on every rank: each call agrees
    the largest prefix count across ranks and pads to it, and `top_up` makes the calls a rank did
    not need (its samples all diverged early), so ZeRO-3's collective gathers always pair up."""
    inner = baseline_next_token_probs(model)
    state = {"made": 0}

    def next_token_probs(prefixes):
        state["made"] += 1
        count = torch.tensor([len(prefixes)], device=model.embed_tokens.weight.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        padded = list(prefixes) + [prefixes[0]] * (int(count.item()) - len(prefixes))
        return inner(padded)[: len(prefixes)]

    def top_up(tokens_T: torch.Tensor) -> None:
        while state["made"] < calls:
            next_token_probs([tokens_T[:1]])
        state["made"] = 0

    return next_token_probs, top_up


def _sum_reduce(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def seed_evaluation(seed: int, device: torch.device) -> None:
    """Seed the streams evaluation draws from: the CPU's and this rank's device only (inside a
    fork_rng that puts them back afterwards)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device only, unlike torch.manual_seed


@torch.no_grad()
def evaluate(model, cfg: JobConfig, blocks_BT: torch.Tensor, device: torch.device,
             level_blocks_BT: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out metrics for the stage: reconstruction for the autoencoder, energy loss, the
    unconditional level and BrierLM for CALM, cross-entropy, perplexity and BrierLM for the baseline.

    Evaluation draws its noise from its own seeded streams and puts the training streams back, so
    how often a run evaluates never changes the run itself, and every evaluation of the same
    weights gives the same figures. CALM's unconditional level is measured on `level_blocks_BT`
    (default: this rank's blocks), the same on every rank."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_evaluation(cfg.training.seed, device)
        return _evaluate(model, cfg, blocks_BT, device, blocks_BT if level_blocks_BT is None else level_blocks_BT)


def _evaluate(model, cfg: JobConfig, blocks_BT: torch.Tensor, device: torch.device,
              level_blocks_BT: torch.Tensor) -> dict[str, float]:
    was_training = model.training
    model.eval()
    stage = cfg.training.stage
    loss_sum, count = 0.0, 0
    extra_sum = 0.0
    brier = BrierAccumulator()
    generator = torch.Generator(device=device).manual_seed(cfg.training.seed)
    for block in blocks_BT.to(device):
        if stage == "autoencoder":
            k = cfg.autoencoder.patch_size
            out = model(block.reshape(1, -1, k))
            loss_sum += out.ce.item()
            extra_sum += model.reconstruction_accuracy(block.reshape(1, -1, k)).item()
        elif stage == "calm":
            loss_sum += model(block[None]).loss.item()
            brier.update(calm_block_terms(model, block[None]))
        else:
            loss_sum += model(block[None]).loss.item()
            next_token_probs, top_up = _fixed_call_count(model, calls=brier.max_n - 1)
            probs_TV = torch.softmax(model.logits(block[None, :-1])[0].float(), dim=-1)
            brier.update(baseline_brier_terms(probs_TV, block, next_token_probs, generator, max_n=brier.max_n))
            top_up(block)
        count += 1
    if was_training:
        model.train()

    if stage == "autoencoder":
        loss, acc, n = _sum_reduce([loss_sum, extra_sum, count], device)
        return {"ce": loss / n, "recon_acc": acc / n, "blocks": n}
    # The level a CALM that ignores its context reaches (the collapse alarm): computed on the same
    # blocks by every rank, so it is not summed over ranks.
    level = unconditional_energy(model, level_blocks_BT.to(device)) if stage == "calm" else None
    loss, n = _sum_reduce([loss_sum, count], device)
    state = brier.state()
    if dist.is_initialized() and dist.get_world_size() > 1:
        state = state.to(device)
        dist.all_reduce(state)
    result = BrierAccumulator.from_state(state).result()
    metrics = {"loss": loss / n, "blocks": n, **{k: result[k] for k in ("brier1", "brier2", "brier3", "brier4", "brierlm")}}
    if stage == "baseline":
        metrics["ppl"] = float(torch.tensor(loss / n).exp())
    if stage == "calm":
        metrics["uncond"] = level
        metrics["gap_pct"] = 100 * (metrics["uncond"] - metrics["loss"]) / metrics["uncond"]
    return metrics

