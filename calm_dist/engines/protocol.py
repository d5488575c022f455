"""What the trainer and the checkpoint manager ask of a training engine, whichever regime.

Two engines implement it: `ZeroEngine` (DeepSpeed ZeRO around the whole model, `zero3`) and
`ModelParallelEngine` (megatron-core tensor/pipeline parallelism, `3d`). The trainer has one
`train_step` and one evaluation call; the checkpoint manager calls `save_checkpoint` /
`load_checkpoint` inside its atomic protocol (DeepSpeed's own signatures, so that a bare DeepSpeed
engine is one too) and reads `module` and `optimizer` to refuse non-finite state.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

# next_batch(): the next micro-batch of token blocks, on the engine's device.
NextBatch = Callable[[], torch.Tensor]
# on_skip(micro_batches, in_a_row, what): micro-batches dropped for a non-finite loss or gradient
# (`in_a_row` such events so far in this step); it may raise to stop the run.
OnSkip = Callable[[int, int, str], None]


class TrainEngine(Protocol):
    module: nn.Module  # the model, or this rank's pipeline chunks in order
    optimizer: torch.optim.Optimizer
    ds_config: dict | None  # the merged DeepSpeed config (saved with the run), None without DeepSpeed

    def train_step(self, next_batch: NextBatch, on_skip: OnSkip) -> dict[str, float]:
        """One optimizer step over a global batch's worth of micro-batches, skipping (and
        replacing) those with a non-finite loss or gradient. Returns the mean loss, the model
        kind's logged outputs, `grad_norm` and `lr` (the largest of the groups')."""

    def evaluate(self, blocks_BT: torch.Tensor, level_blocks_BT: torch.Tensor | None) -> dict[str, float]:
        """The in-training evaluation of this replica's held-out blocks, the same on every rank."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = False) -> None: ...

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str | None, dict]: ...
