"""Rollouts in lockstep across ranks, for a model whose parameters ZeRO-3 gathers collectively:
every rank must run the same forwards, whatever its own samples need."""

from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.models.scoring import baseline_next_token_probs


class LockstepRollouts:
    """A rollout factory for `score_baseline_block`. Each call of the callable it makes agrees the
    largest prefix count across ranks and pads to it, and `top_up` then makes the calls a rank did
    not need (its samples all diverged early), so the collective gathers always pair up. Padding
    never changes the rows a rank reads."""

    def __init__(self, calls: int):
        self.calls, self.made = calls, 0
        self.next_token_probs = None  # made by the first call: kinds without rollouts never make it

    def __call__(self, model):
        inner = baseline_next_token_probs(model)

        def next_token_probs(prefixes):
            self.made += 1
            count = torch.tensor([len(prefixes)], device=model.embed_tokens.weight.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            padded = list(prefixes) + [prefixes[0]] * (int(count.item()) - len(prefixes))
            return inner(padded)[: len(prefixes)]

        self.next_token_probs = next_token_probs
        return next_token_probs

    def top_up(self, block_T: torch.Tensor) -> None:
        """The calls this rank did not make for the block just scored."""
        if self.next_token_probs is None:
            return
        while self.made < self.calls:
            self.next_token_probs([block_T[:1]])
        self.made = 0
