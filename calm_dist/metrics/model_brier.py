"""BrierLM of a model on evaluation blocks: adapters from CALM and the baseline to the estimators in
`brier.py` (CALM.md §3.2, §3.3, §9.7, §9.8)."""

from __future__ import annotations

import torch

from calm_dist.metrics.brier import (
    BrierAccumulator,
    baseline_brier_terms,
    calm_brier_terms,
    chunk_aligned_starts,
)


@torch.no_grad()
def calm_block_terms(model, tokens_BT: torch.Tensor, max_n: int = 4) -> torch.Tensor:
    """Teacher-forced two-sample terms for blocks of (S + 1) * K tokens: (B * S, max_n)."""
    k = model.cfg.patch_size
    h_BSD = model.hidden_states(tokens_BT[:, :-k])
    samples_2PK = model.sample_chunks(h_BSD.reshape(-1, h_BSD.shape[-1]), 2)
    targets_PK = tokens_BT[:, k:].reshape(-1, k)
    return calm_brier_terms(samples_2PK[0], samples_2PK[1], targets_PK, max_n=max_n)


def baseline_next_token_probs(model, micro_batch: int = 8):
    """The `next_token_probs` callable for `baseline_brier_terms`. Prefixes are right-padded into
    micro-batches (causal attention makes the padding invisible to the positions read) and only
    the last position of each goes through the vocabulary projection, so memory stays at
    micro_batch x T x D plus micro_batch x V. Each prefix is recomputed from scratch: a KV cache of
    the shared context would be cheaper and is the next optimisation."""

    def next_token_probs(prefixes: list[torch.Tensor]) -> torch.Tensor:
        device = model.embed_tokens.weight.device
        out = []
        for first in range(0, len(prefixes), micro_batch):
            group = prefixes[first : first + micro_batch]
            lengths = torch.tensor([len(p) for p in group], device=device)
            batch = torch.full((len(group), int(lengths.max())), model.cfg.pad_token_id, dtype=torch.long, device=device)
            for row, prefix in enumerate(group):
                batch[row, : len(prefix)] = prefix.to(device)
            h_BTD = model.backbone(model.embed_tokens(batch))
            last_BD = h_BTD[torch.arange(len(group), device=device), lengths - 1]
            out.append(torch.softmax(model.lm_head(last_BD).float(), dim=-1))
        return torch.cat(out)

    return next_token_probs


@torch.no_grad()
def baseline_block_terms(
    model, tokens_T: torch.Tensor, generator: torch.Generator, aligned: bool = False, max_n: int = 4
) -> torch.Tensor:
    """Terms for one block of T tokens; `aligned` scores only n-grams starting at chunk boundaries
    (like CALM's targets) for a like-for-like comparison (§9.8)."""
    probs_TV = torch.softmax(model.logits(tokens_T[None, :-1])[0].float(), dim=-1)
    starts = chunk_aligned_starts(tokens_T.shape[0], model.cfg.patch_size, max_n) if aligned else None
    return baseline_brier_terms(
        probs_TV, tokens_T, baseline_next_token_probs(model), generator, max_n=max_n, starts=starts
    )


@torch.no_grad()
def evaluate_brier(model, blocks_BT: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> dict:
    """BrierLM over evaluation blocks. kind: 'calm', or 'baseline' (all starts and chunk-aligned)."""
    if kind == "calm":
        acc = BrierAccumulator()
        for block in blocks_BT:
            acc.update(calm_block_terms(model, block[None]))
        return acc.result()
    if kind != "baseline":
        raise ValueError(f"kind must be 'calm' or 'baseline', got {kind!r}")
    generator = generator or torch.Generator(device=blocks_BT.device).manual_seed(0)
    every, aligned = BrierAccumulator(), BrierAccumulator()
    k = model.cfg.patch_size
    for block in blocks_BT:
        terms_SN = baseline_block_terms(model, block, generator)
        every.update(terms_SN)
        # Aligned starts are a subset of all starts (start i = index i): the same draws, unbiased.
        aligned.update(terms_SN[chunk_aligned_starts(block.shape[0], k, every.max_n)])
    return {**every.result(), "aligned": aligned.result()}
