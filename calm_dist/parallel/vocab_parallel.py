"""The token baseline's output layer split over the tensor ranks by vocabulary (the 3d regime).

Replicated, every tensor rank would compute all B x T x V logits, the largest activation of a
token model with a 128k vocabulary. Split, a rank holds the weight rows of its vocabulary slice,
computes those logits only, and the cross-entropy is reduced over the ranks (megatron's
`vocab_parallel_cross_entropy`): no rank ever holds the full logits.

Slices follow `torch.chunk(V, TP)` (ceil(V / TP) rows, the last rank fewer when TP does not divide
V), so the shards of `lm_head.weight` concatenate back into the full weight; the last rank pads its
logits with the lowest float to the common width, which the softmax turns into probability 0.

Applied from outside the model: `parallelize_output` swaps `lm_head` and `token_loss` of a built
`TokenBaseline` on the last pipeline stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_dist.parallel.state import ParallelLayout


class VocabParallelOutput(nn.Module):
    def __init__(self, full_weight_VD: torch.Tensor, tp_rank: int, tensor_parallel: int):
        super().__init__()
        vocab = full_weight_VD.shape[0]
        slices = full_weight_VD.detach().chunk(tensor_parallel)
        if len(slices) != tensor_parallel:
            raise ValueError(f"a vocabulary of {vocab} cannot be split over {tensor_parallel} tensor ranks")
        self.slice_width = slices[0].shape[0]  # every rank's logits width (the last one padded)
        self.weight = nn.Parameter(slices[tp_rank].clone())
        self.padding = self.slice_width - self.weight.shape[0]

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """This rank's logits (B, T, V / TP); the gradient of h is summed over the ranks."""
        from megatron.core import tensor_parallel

        logits = F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(h_BTD), self.weight)
        if self.padding:
            logits = F.pad(logits, (0, self.padding), value=torch.finfo(logits.dtype).min)
        return logits


def vocab_parallel_token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) from vocabulary-split logits."""
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits_BTV.float(), targets_BT).mean()


def parallelize_output(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Split a TokenBaseline's output layer over the tensor ranks (last stage, TP > 1)."""
    if type(model).__name__ != "TokenBaseline" or layout.tensor_parallel == 1 or not layout.last_stage:
        return model
    model.lm_head = VocabParallelOutput(model.lm_head.weight, layout.tp_rank, layout.tensor_parallel)
    model.token_loss = vocab_parallel_token_loss
    return model
