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


def baseline_next_token_probs(model):
    """The `next_token_probs` callable for `baseline_brier_terms`: prefixes are right-padded into
    one batch; causal attention makes the padding invisible to the positions that are read."""

    def next_token_probs(prefixes: list[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([len(p) for p in prefixes])
        batch = torch.full((len(prefixes), int(lengths.max())), model.cfg.pad_token_id, dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            batch[row, : len(prefix)] = prefix.cpu()
        batch = batch.to(model.embed_tokens.weight.device)
        logits_BTV = model.logits(batch)
        last = logits_BTV[torch.arange(len(prefixes)), (lengths - 1).to(batch.device)]
        return torch.softmax(last.float(), dim=-1)

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
    for block in blocks_BT:
        every.update(baseline_block_terms(model, block, generator))
        aligned.update(baseline_block_terms(model, block, generator, aligned=True))
    return {**every.result(), "aligned": aligned.result()}
