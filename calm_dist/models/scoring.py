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
from calm_dist.ops.brier import NextTokenProbs, baseline_brier_terms, calm_brier_terms, chunk_aligned_starts

MAX_N = 4  # Brier-1..4
# (model, block_T, the block's recorded context or None) -> the callable that runs the block's sampled
# continuations
RolloutFactory = Callable[[torch.nn.Module, torch.Tensor, SharedContext | None], NextTokenProbs]


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


def recomputed_next_token_probs(model, block_T: torch.Tensor, context: SharedContext | None = None,
                                micro_batch: int = 8) -> NextTokenProbs:
    """The `next_token_probs` callable for `baseline_brier_terms` that runs every path (context and
    continuation) from scratch: paths are right-padded into micro-batches (causal attention makes
    the padding invisible to the positions read) and only the last position of each goes through
    the vocabulary projection. Any attention backend; `context` is not used. `tree_next_token_probs`
    is the fast one."""

    def next_token_probs(starts_A: torch.Tensor, continuation_AJ: torch.Tensor) -> torch.Tensor:
        device = model.embed_tokens.weight.device
        paths = [torch.cat([block_T[: int(start) + 1].to(device), continuation_J.to(device)])
                 for start, continuation_J in zip(starts_A.tolist(), continuation_AJ)]
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


def rollout_tree(starts_A: torch.Tensor, continuation_AJ: torch.Tensor,
                 context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of one rollout forward over a recorded context of `context` steps: every row's J
    continuation tokens in a row (S = A * J steps). Returns each step's position and the (S,
    context + S) mask of the keys it may see: the context up to its row's start, then its own row's
    tokens up to itself, as the causal forward of its own path would."""
    device = continuation_AJ.device
    rows, width = continuation_AJ.shape
    positions_S = (starts_A[:, None] + 1 + torch.arange(width, device=device)).flatten()
    sees_context_SC = (torch.arange(context, device=device) <= starts_A[:, None]).repeat_interleave(width, dim=0)
    own_JJ = torch.ones(width, width, device=device).tril()
    sees_own_SS = torch.kron(torch.eye(rows, device=device), own_JJ).bool()  # block diagonal
    return positions_S, torch.cat([sees_context_SC, sees_own_SS], dim=1)


def tree_next_token_probs(model, block_T: torch.Tensor, context: SharedContext,
                          rows_per_forward: int = 128) -> NextTokenProbs:
    """The `next_token_probs` callable for `baseline_brier_terms` that runs only the sampled tokens:
    up to `rows_per_forward` continuations per forward (`Backbone.forward_tree`), attending to the
    block's keys and values that `context` recorded in the teacher-forced forward. A call costs
    ceil(A / rows_per_forward) forwards whatever the rows' lengths (what ZeRO-3's lockstep needs).
    Same probabilities as `recomputed_next_token_probs` up to float rounding (tested)."""

    def next_token_probs(starts_A: torch.Tensor, continuation_AJ: torch.Tensor) -> torch.Tensor:
        device = model.embed_tokens.weight.device
        starts_A, continuation_AJ = starts_A.to(device), continuation_AJ.to(device)
        width = continuation_AJ.shape[1]
        out = []
        for first in range(0, starts_A.shape[0], rows_per_forward):
            starts_G = starts_A[first : first + rows_per_forward]
            continuation_GJ = continuation_AJ[first : first + rows_per_forward]
            positions_S, allowed_SK = rollout_tree(starts_G, continuation_GJ, context.length)
            x_1SD = model.embed_tokens(continuation_GJ.flatten())[None]
            h_SD = model.backbone.forward_tree(x_1SD, positions_S, allowed_SK, context)[0]
            last_GD = h_SD[width - 1 :: width]  # each row's last token
            out.append(torch.softmax(model.lm_head(last_GD).float(), dim=-1))
        return torch.cat(out)

    return next_token_probs


def baseline_next_token_probs(model, block_T: torch.Tensor, context: SharedContext | None) -> NextTokenProbs:
    """The rollout for this model: only the sampled tokens, attending to the recorded context,
    where the attention backend takes explicit masks (all but 'te'); otherwise every path from
    scratch."""
    if context is not None:
        return tree_next_token_probs(model, block_T, context)
    return recomputed_next_token_probs(model, block_T)


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
    """Next-token cross-entropy per token and BrierLM terms over every start and over the
    chunk-aligned starts (the same draws). `rollout` builds the callable that runs the sampled
    continuations (default: `baseline_next_token_probs`)."""
    # The teacher-forced forward records its keys and values: the rollouts attend to them.
    context = SharedContext(model.backbone) if model.backbone.takes_attention_masks else None
    with context.recording() if context is not None else contextlib.nullcontext():
        logits_TV = model.logits(block_T[None, :-1])[0].float()
    nll = float(F.cross_entropy(logits_TV, block_T[1:], reduction="sum"))
    generator = torch.Generator(device=block_T.device).manual_seed(seed)
    next_token_probs = (rollout or baseline_next_token_probs)(model, block_T, context)
    terms_SN = baseline_brier_terms(torch.softmax(logits_TV, dim=-1), block_T, next_token_probs, generator,
                                    max_n=MAX_N)
    # Start i is row i, so the aligned starts pick their rows from the same draws (§9.8).
    aligned = terms_SN[chunk_aligned_starts(block_T.shape[0], model.cfg.patch_size, MAX_N)]
    return BlockScore(nll, loss_weight=logits_TV.shape[0], brier={"all": terms_SN, "aligned": aligned})
