"""Vocabulary-sized tables split over the tensor ranks by vocabulary rows (the 3d regime).

- Input embeddings (CALM and the baseline, first chunk): a rank holds the rows of its slice, looks
  up the ids that fall in it (zeros for the others), and the ranks' lookups are summed: V x D
  weights and their optimizer state are divided by TP instead of replicated.
- The baseline's output layer (last chunk): replicated, every tensor rank would compute all
  B x T x V logits, the largest activation of a token model with a 128k vocabulary. Split, a rank
  computes the logits of its slice only and the cross-entropy is reduced over the ranks (megatron's
  `vocab_parallel_cross_entropy`): no rank ever holds the full logits.

Slices follow `torch.chunk(V, TP)` (ceil(V / TP) rows, the last rank fewer when TP does not divide
V), so the shards concatenate back into the full weight; the last rank pads its logits with the
lowest float to the common width, which the softmax turns into probability 0.

Applied from outside the model: `parallelize_vocabulary` swaps `embed_tokens`, `lm_head` and
`token_loss` of a built model chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel as mcore_tp
from torch import nn

from calm_dist.parallel.state import ParallelLayout


def _slices(full_weight_VD: torch.Tensor, tensor_parallel: int) -> tuple[torch.Tensor, ...]:
    slices = full_weight_VD.detach().chunk(tensor_parallel)
    if len(slices) != tensor_parallel:
        raise ValueError(f"a vocabulary of {full_weight_VD.shape[0]} cannot be split over {tensor_parallel} tensor ranks")
    return slices


def _shard_parameter(rows_VD: torch.Tensor) -> nn.Parameter:
    """This rank's rows as a parameter marked the way megatron's own split layers mark theirs, so
    that megatron-core's gradient norm counts it on every tensor rank (a replicated weight counts
    on tensor rank 0 only)."""
    weight = nn.Parameter(rows_VD.clone())
    mcore_tp.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=0, stride=1)
    return weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, full_weight_VD: torch.Tensor, tp_rank: int, tensor_parallel: int):
        super().__init__()
        slices = _slices(full_weight_VD, tensor_parallel)
        self.start = sum(piece.shape[0] for piece in slices[:tp_rank])
        self.weight = _shard_parameter(slices[tp_rank])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the ids (summed over the ranks: each contributes the ids of its slice)."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        return mcore_tp.reduce_from_tensor_model_parallel_region(embedded)


class VocabParallelOutput(nn.Module):
    def __init__(self, full_weight_VD: torch.Tensor, tp_rank: int, tensor_parallel: int):
        super().__init__()
        slices = _slices(full_weight_VD, tensor_parallel)
        self.slice_width = slices[0].shape[0]  # every rank's logits width (the last one padded)
        self.weight = _shard_parameter(slices[tp_rank])
        self.padding = self.slice_width - self.weight.shape[0]

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """This rank's logits (B, T, V / TP); the gradient of h is summed over the ranks."""
        logits = F.linear(mcore_tp.copy_to_tensor_model_parallel_region(h_BTD), self.weight)
        if self.padding:
            logits = F.pad(logits, (0, self.padding), value=torch.finfo(logits.dtype).min)
        return logits


def vocab_parallel_token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) from vocabulary-split logits."""
    return mcore_tp.vocab_parallel_cross_entropy(logits_BTV.float(), targets_BT).mean()


def parallelize_vocabulary(model: nn.Module, layout: ParallelLayout, first: bool, last: bool) -> nn.Module:
    """Split a model chunk's vocabulary tables over the tensor ranks (TP > 1): the input embedding
    on the first chunk, the baseline's output layer on the last."""
    if layout.tensor_parallel == 1:
        return model
    tp_rank, tp = layout.tp_rank, layout.tensor_parallel
    if first:
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight, tp_rank, tp)
    if last and type(model).__name__ == "TokenBaseline":
        model.lm_head = VocabParallelOutput(model.lm_head.weight, tp_rank, tp)
        model.token_loss = vocab_parallel_token_loss
    return model
