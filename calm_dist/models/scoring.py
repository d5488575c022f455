"""One evaluation block's figures for each model kind: loss, BrierLM terms (CALM.md §3.2, §3.3,
§9.7, §9.8) and reconstruction, as plain numbers and tensors. Summing them over blocks and ranks
is `calm_dist.evaluation`'s job; the caller seeds the block's random streams first."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from calm_dist.models.shared_context import SharedContext
from calm_dist.ops.brier import (
    BlocksNextTokenProbs,
    baseline_brier_terms_blocks,
    calm_brier_terms,
    chunk_aligned_starts,
)

MAX_N = 4  # Brier-1..4
# (model, blocks_BT, the blocks' recorded context or None) -> the callable that runs the blocks' sampled
# continuations
RolloutFactory = Callable[[torch.nn.Module, torch.Tensor, SharedContext | None], BlocksNextTokenProbs]


@dataclass
class BlockScore:
    """`loss` / `loss_weight` summed over blocks is the mean loss (per block, or per token for the
    baseline); `scalars` are other per-block sums; `brier` maps a family to its (S, MAX_N) terms."""

    loss: float
    loss_weight: float = 1.0
    scalars: dict[str, float] = field(default_factory=dict)
    brier: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def calm_block_terms(model, tokens_BT: torch.Tensor, max_n: int = MAX_N) -> torch.Tensor:
    """Teacher-forced two-sample terms for blocks of (S + 1) * K tokens: (B * S, max_n)."""
    k = model.cfg.patch_size
    h_BSD = model.hidden_states(tokens_BT[:, :-k])
    samples_2PK = model.sample_chunks(h_BSD.reshape(-1, h_BSD.shape[-1]), 2)
    targets_PK = tokens_BT[:, k:].reshape(-1, k)
    return calm_brier_terms(samples_2PK[0], samples_2PK[1], targets_PK, max_n=max_n)


def recomputed_next_token_probs(model, blocks_BT: torch.Tensor, context: SharedContext | None = None,
                                micro_batch: int = 8) -> BlocksNextTokenProbs:
    """The `next_token_probs` callable for `baseline_brier_terms_blocks` that runs every path
    (context and continuation) from scratch: paths are right-padded into micro-batches (causal
    attention makes the padding invisible to the positions read) and only the last position of each
    goes through the vocabulary projection. Any attention backend; `context` is not used.
    `tree_next_token_probs` is the fast one."""

    def next_token_probs(blocks_A: torch.Tensor, starts_A: torch.Tensor, continuation_AJ: torch.Tensor) -> torch.Tensor:
        device = model.embed_tokens.weight.device
        paths = [torch.cat([blocks_BT[block, : start + 1].to(device), continuation_J.to(device)])
                 for block, start, continuation_J in zip(blocks_A.tolist(), starts_A.tolist(), continuation_AJ)]
        out = []
        for first in range(0, len(paths), micro_batch):
            group = paths[first : first + micro_batch]
            lengths = torch.tensor([len(p) for p in group], device=device)
            batch = torch.full((len(group), int(lengths.max())), model.cfg.pad_token_id, dtype=torch.long, device=device)
            for row, path in enumerate(group):
                batch[row, : len(path)] = path
            h_BTD = model.backbone(model.embed_tokens(batch))
            last_BD = h_BTD[torch.arange(len(group), device=device), lengths - 1]
            out.append(torch.softmax(model.lm_head(last_BD).float(), dim=-1))
        return torch.cat(out)

    return next_token_probs


def rollout_tree(starts_A: torch.Tensor, continuation_AJ: torch.Tensor, context: int,
                 offsets_A: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of one rollout forward over a recorded context of `context` steps: every row's J
    continuation tokens in a row (S = A * J steps). Returns each step's position and the (S,
    context + S) mask of the keys it may see: the context up to its row's start, then its own row's
    tokens up to itself, as the causal forward of its own path would. `offsets_A`: where each row's
    block begins in a context of several blocks laid end to end (default: one block)."""
    device = continuation_AJ.device
    rows, width = continuation_AJ.shape
    offsets_A = torch.zeros_like(starts_A) if offsets_A is None else offsets_A
    positions_S = (starts_A[:, None] + 1 + torch.arange(width, device=device)).flatten()
    steps_C = torch.arange(context, device=device)
    sees_context_AC = (steps_C >= offsets_A[:, None]) & (steps_C <= (offsets_A + starts_A)[:, None])
    sees_context_SC = sees_context_AC.repeat_interleave(width, dim=0)
    own_JJ = torch.ones(width, width, device=device).tril()
    sees_own_SS = torch.kron(torch.eye(rows, device=device), own_JJ).bool()  # block diagonal
    return positions_S, torch.cat([sees_context_SC, sees_own_SS], dim=1)


def tree_next_token_probs(model, blocks_BT: torch.Tensor, context: SharedContext,
                          rows_per_forward: int = 128) -> BlocksNextTokenProbs:
    """The `next_token_probs` callable for `baseline_brier_terms_blocks` that runs only the sampled
    tokens: up to `rows_per_forward` continuations per forward (`Backbone.forward_tree`), whichever
    blocks they continue, attending to the keys and values that `context` recorded in the
    teacher-forced forward for those blocks only. A call costs ceil(A / rows_per_forward) forwards
    whatever the rows' lengths (what ZeRO-3's lockstep needs). Same probabilities as `recomputed_next_token_probs` up
    to float rounding (tested)."""

    def next_token_probs(blocks_A: torch.Tensor, starts_A: torch.Tensor, continuation_AJ: torch.Tensor) -> torch.Tensor:
        device = model.embed_tokens.weight.device
        blocks_A, starts_A, continuation_AJ = blocks_A.to(device), starts_A.to(device), continuation_AJ.to(device)
        width = continuation_AJ.shape[1]
        out = []
        for first in range(0, starts_A.shape[0], rows_per_forward):
            group = slice(first, first + rows_per_forward)
            continuation_GJ, blocks_G = continuation_AJ[group], blocks_A[group]
            # Rows come block after block: attend only to the blocks this group continues.
            first_block = int(blocks_G.min())
            near = context.blocks_span(first_block, int(blocks_G.max()) + 1)
            positions_S, allowed_SK = rollout_tree(starts_A[group], continuation_GJ, near.length,
                                                   offsets_A=(blocks_G - first_block) * near.steps_per_block)
            x_1SD = model.embed_tokens(continuation_GJ.flatten())[None]
            h_SD = model.backbone.forward_tree(x_1SD, positions_S, allowed_SK, near)[0]
            last_GD = h_SD[width - 1 :: width]  # each row's last token
            out.append(torch.softmax(model.lm_head(last_GD).float(), dim=-1))
        return torch.cat(out)

    return next_token_probs


def baseline_next_token_probs(model, blocks_BT: torch.Tensor, context: SharedContext | None) -> BlocksNextTokenProbs:
    """The rollout for this model: only the sampled tokens, attending to the recorded context,
    where the attention backend takes explicit masks (all but 'te'); otherwise every path from
    scratch."""
    if context is not None:
        return tree_next_token_probs(model, blocks_BT, context)
    return recomputed_next_token_probs(model, blocks_BT)


def _reconstruction(autoencoder, block_T: torch.Tensor) -> dict[str, float]:
    chunks = block_T.reshape(1, -1, autoencoder.cfg.patch_size)
    return {"recon_sample": float(autoencoder.reconstruction_accuracy(chunks)),
            "recon_mean": float(autoencoder.reconstruction_accuracy(chunks, use_mean=True))}


@torch.no_grad()
def score_autoencoder_block(model, block_T: torch.Tensor, seed: int, *, reconstruction: bool = True,
                            rollout: RolloutFactory | None = None) -> BlockScore:
    """Cross-entropy of the reconstruction and token accuracy (a posterior sample, the mean)."""
    loss = float(model(block_T.reshape(1, -1, model.cfg.patch_size)).ce)
    return BlockScore(loss, scalars=_reconstruction(model, block_T))


@torch.no_grad()
def score_calm_block(model, block_T: torch.Tensor, seed: int, *, reconstruction: bool = True,
                     rollout: RolloutFactory | None = None) -> BlockScore:
    """BrierLM terms from two head samples per position, the energy loss, and (after everything
    else, so it never shifts their draws) the frozen autoencoder's reconstruction."""
    terms_SN = calm_block_terms(model, block_T[None])
    score = BlockScore(float(model(block_T[None]).loss), brier={"calm": terms_SN})
    if reconstruction:
        score.scalars.update(_reconstruction(model.autoencoder, block_T))
    return score


@torch.no_grad()
def score_baseline_block(model, block_T: torch.Tensor, seed: int, *, reconstruction: bool = True,
                         rollout: RolloutFactory | None = None) -> BlockScore:
    """`score_baseline_blocks` of one block."""
    return score_baseline_blocks(model, block_T[None], [seed], rollout=rollout)[0]


@torch.no_grad()
def score_baseline_blocks(model, blocks_BT: torch.Tensor, seeds: list[int], *,
                          rollout: RolloutFactory | None = None) -> list[BlockScore]:
    """Next-token cross-entropy per token and BrierLM terms over every start and over the
    chunk-aligned starts (the same draws), for blocks of equal length in one teacher-forced forward
    and one rollout forward per step; block b's draws come from `seeds[b]`, so its figures are
    those it gets alone (up to float rounding). `rollout` builds the callable that runs the sampled
    continuations (default: `baseline_next_token_probs`)."""
    # The teacher-forced forward records its keys and values: the rollouts attend to them.
    context = SharedContext(model.backbone) if model.backbone.takes_attention_masks else None
    with context.recording() if context is not None else contextlib.nullcontext():
        logits_BTV = model.logits(blocks_BT[:, :-1]).float()
    nll_B = F.cross_entropy(logits_BTV.transpose(1, 2), blocks_BT[:, 1:], reduction="none").sum(dim=1)
    generators = [torch.Generator(device=blocks_BT.device).manual_seed(seed) for seed in seeds]
    next_token_probs = (rollout or baseline_next_token_probs)(model, blocks_BT, context)
    terms_BSN = baseline_brier_terms_blocks(torch.softmax(logits_BTV, dim=-1), blocks_BT, next_token_probs,
                                            generators, max_n=MAX_N)
    # Start i is row i, so the aligned starts pick their rows from the same draws (§9.8).
    aligned = chunk_aligned_starts(blocks_BT.shape[1], model.cfg.patch_size, MAX_N)
    return [BlockScore(float(nll), loss_weight=logits_BTV.shape[1], brier={"all": terms_SN, "aligned": terms_SN[aligned]})
            for nll, terms_SN in zip(nll_B.tolist(), terms_BSN)]
