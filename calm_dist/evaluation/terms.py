"""Per-block BrierLM terms of a model: adapters from CALM and the baseline to the estimators in
`calm_dist.ops.brier` (CALM.md §3.2, §3.3, §9.7, §9.8)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.ops.brier import calm_brier_terms


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


def lockstep_next_token_probs(model, calls: int):
    """`baseline_next_token_probs` for a model whose parameters ZeRO-3 gathers collectively: every
    rank must run the same forwards. Each call agrees the largest prefix count across ranks and pads
    to it, and `top_up` makes the calls a rank did not need (its samples all diverged early), so
    the gathers always pair up. Padding never changes the rows a rank reads."""
    inner = baseline_next_token_probs(model)
    made = [0]

    def next_token_probs(prefixes):
        made[0] += 1
        count = torch.tensor([len(prefixes)], device=model.embed_tokens.weight.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        padded = list(prefixes) + [prefixes[0]] * (int(count.item()) - len(prefixes))
        return inner(padded)[: len(prefixes)]

    def top_up(tokens_T: torch.Tensor) -> None:
        while made[0] < calls:
            next_token_probs([tokens_T[:1]])
        made[0] = 0

    return next_token_probs, top_up
