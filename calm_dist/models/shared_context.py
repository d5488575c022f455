"""The keys and values of one causal forward, kept per layer, that later forwards attend to.

BrierLM's baseline rollouts (CALM.md §3.3) branch up to three sampled tokens from every start of a
block whose context the teacher-forced forward has just run: recording that forward's keys and
values lets each rollout step run only its new tokens (`Backbone.forward_tree`), instead of the
context again for every branch. Recorded at the core attention's input, so the keys already carry
their rotary positions and any backend that takes an explicit mask can attend to them. A forward
of several blocks is kept as one sequence, block after block: a later forward's mask says which
block each of its steps sees.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch


class SharedContext:
    """Keys and values of the forward run under `recording()`, one pair per layer, its B blocks
    laid end to end (B x steps_per_block steps); forwards run under `attending()` see those steps
    before their own, their mask covering [their steps, recorded + their steps]."""

    def __init__(self, backbone):
        if not backbone.takes_attention_masks:
            raise ValueError(f"attention backend {backbone.attention_backend!r} takes no explicit masks")
        self._cores = [layer.self_attention.core_attention for layer in backbone.decoder.layers]
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.blocks = 0

    @property
    def length(self) -> int:
        """Steps recorded, over all blocks."""
        return self._kv[0][0].shape[0] if self._kv else 0

    @property
    def steps_per_block(self) -> int:
        return self.length // self.blocks if self.blocks else 0

    def blocks_span(self, first: int, end: int) -> SharedContext:
        """The recorded blocks [first, end) alone, as views (no copy). A forward attending to them
        runs attention over their steps only: rollout rows that continue these blocks gain nothing
        from the other blocks' keys, which their masks hide anyway, and at long contexts that
        attention is most of a rollout forward's work."""
        if not 0 <= first < end <= self.blocks:
            raise ValueError(f"blocks [{first}, {end}) are not within the {self.blocks} recorded")
        steps = self.steps_per_block
        span = copy.copy(self)
        span._kv = [(key[first * steps : end * steps], value[first * steps : end * steps]) for key, value in self._kv]
        span.blocks = end - first
        return span

    @contextlib.contextmanager
    def _hooks(self, hook_for) -> Iterator[None]:
        handles = [core.register_forward_pre_hook(hook_for(i)) for i, core in enumerate(self._cores)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def recording(self) -> contextlib.AbstractContextManager:
        """Keep the keys and values the next forward computes, its blocks laid end to end."""
        self._kv = [None] * len(self._cores)

        def end_to_end(x_SBHD: torch.Tensor) -> torch.Tensor:
            steps, blocks = x_SBHD.shape[:2]
            return x_SBHD.transpose(0, 1).reshape(blocks * steps, 1, *x_SBHD.shape[2:])

        def hook_for(i):
            def record(module, args):
                _, key, value = args[:3]  # sequence-first: (steps, blocks, heads, head dim)
                self.blocks = key.shape[1]
                self._kv[i] = (end_to_end(key), end_to_end(value))

            return record

        return self._hooks(hook_for)

    def attending(self) -> contextlib.AbstractContextManager:
        """Forwards inside attend to the recorded steps first, then to their own."""
        if not self._kv or any(kv is None for kv in self._kv):
            raise RuntimeError("nothing recorded: run the context's forward under recording() first")

        def hook_for(i):
            def prepend(module, args):
                query, key, value, *rest = args
                recorded_key, recorded_value = self._kv[i]
                return (query, torch.cat([recorded_key, key]), torch.cat([recorded_value, value]), *rest)

            return prepend

        return self._hooks(hook_for)
