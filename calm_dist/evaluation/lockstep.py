"""Rollouts in lockstep across ranks, for a model whose parameters ZeRO-3 gathers collectively:
every rank must run the same forwards, whatever its own samples need."""

from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.models.scoring import baseline_next_token_probs


class LockstepRollouts:
    """A rollout factory for `score_baseline_blocks`. Each call of the callable it makes agrees the
    largest row count across ranks and pads to it, and `top_up` then makes the calls a rank did
    not need (its samples all diverged early), so the collective gathers always pair up. Padding
    never changes the rows a rank reads."""

    def __init__(self, calls: int):
        self.calls, self.made = calls, 0
        self.next_token_probs = None  # made by the first call: kinds without rollouts never make it

    def __call__(self, model, blocks_BT: torch.Tensor, context):
        inner = baseline_next_token_probs(model, blocks_BT, context)

        def next_token_probs(blocks_A: torch.Tensor, starts_A: torch.Tensor, continuation_AJ: torch.Tensor) -> torch.Tensor:
            self.made += 1
            rows = starts_A.shape[0]
            count = torch.tensor([rows], device=model.embed_tokens.weight.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            padding = int(count.item()) - rows
            # Copies of the last row: rows come block after block, and padding from the last block
            # keeps a rollout forward's rows within as few blocks as before (it attends to theirs).
            blocks_A = torch.cat([blocks_A, blocks_A[-1:].expand(padding)])
            starts_A = torch.cat([starts_A, starts_A[-1:].expand(padding)])
            continuation_AJ = torch.cat([continuation_AJ, continuation_AJ[-1:].expand(padding, -1)])
            return inner(blocks_A, starts_A, continuation_AJ)[:rows]

        self.next_token_probs = next_token_probs
        return next_token_probs

    def top_up(self, blocks_BT: torch.Tensor) -> None:
        """The calls this rank did not make for the blocks just scored."""
        if self.next_token_probs is None:
            return
        while self.made < self.calls:
            first = torch.zeros(1, dtype=torch.long, device=blocks_BT.device)
            self.next_token_probs(first, first, blocks_BT[:1, 1:2])
        self.made = 0
