"""CALM and the token baseline cut into megatron pipeline stages (the 3d regime).

Placement, per stage of `pipeline_parallel`:
- first stage: the token embedding and, for CALM, the input compressor (they read token ids, which
  every stage has anyway, and produce the (S, B, D) activations the backbone exchanges);
- every stage: its `num_layers / pipeline_parallel` backbone layers (megatron numbers them);
- last stage: the final norm, then CALM's energy head, energy loss and the frozen autoencoder's
  target encoding, or the baseline's output layer and cross-entropy. They read the last hidden
  states and the block's tokens, both already there; anywhere else they would cost a send of
  (S, B, D) states forward and of their gradient back. The autoencoder's encoder is small (a few
  percent of a CALM-M step's FLOPs) and frozen, so keeping it off the other stages costs nothing.

Within a stage CALM's energy head, the embeddings and the compressor are replicated over the tensor
ranks: they compute one model replica's activations from identical inputs and identical noise (the
default generator is seeded per replica), so every tensor rank holds the same values and gradients,
and the noise needs no communication. A tensor-parallel head would split its D x D matrices but add
an all-reduce of N x P x D activations per block; the head is about 9% of CALM-XL's trainable
parameters, so it stays replicated (not measured against the alternative yet). The baseline's
output layer, whose B x T x V logits dominate a token model, is split by vocabulary instead
(`calm_dist.parallel.vocab_parallel`).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model
from torch import nn

from calm_dist.models.kinds import ModelKind
from calm_dist.parallel.state import ParallelLayout


def chunk_place(layout: ParallelLayout, vp_stage: int = 0) -> tuple[bool, bool]:
    """(first, last): whether model chunk `vp_stage` of this rank starts or ends the whole model.
    With virtual stages, rank p holds chunks p, P + p, 2P + p, ... of the P x V chunks."""
    first = layout.first_stage and vp_stage == 0
    last = layout.last_stage and vp_stage == layout.virtual_stages - 1
    return first, last


class PipelineStage(nn.Module):
    """One model chunk on one rank, in the form megatron's schedules drive: `config`,
    `model_type`, `vp_stage`, `set_input_tensor`, and a forward that returns the activations to
    send (the last chunk of the model: the model's output with its loss). `pre_process` and
    `share_embeddings_and_output_weights` are what megatron's `finalize_model_grads` reads: our
    models never tie an embedding across stages."""

    share_embeddings_and_output_weights = False

    def __init__(self, model: nn.Module, first: bool, last: bool, steps_per_block: int,
                 vp_stage: int | None = None, autocast_dtype=None):
        super().__init__()
        self.model = model
        self.first, self.last = first, last
        self.pre_process = first
        self.vp_stage = vp_stage  # None without virtual stages (megatron checks it against its own)
        self.steps = steps_per_block
        self.config = model.backbone.config
        self.model_type = ModelType.encoder_or_decoder
        self.autocast_dtype = autocast_dtype

    def set_input_tensor(self, tensors) -> None:
        tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
        self.model.backbone.set_input_tensor(tensor)

    def forward(self, tokens_BT: torch.Tensor):
        precision = contextlib.nullcontext()
        if self.autocast_dtype is not None:  # bf16 compute, fp32 weights and optimizer
            precision = torch.autocast(tokens_BT.device.type, dtype=self.autocast_dtype)
        with precision:
            x_SBD = None
            if self.first:
                x_SBD = self.model.transformer_inputs(tokens_BT).transpose(0, 1).contiguous()
            h_SBD = self.model.backbone.forward_sequence_first(x_SBD, self.steps)
            if not self.last:
                return h_SBD.to(self.config.pipeline_dtype)  # the receiver's buffer dtype
            return self.model.loss_from_hidden(h_SBD.transpose(0, 1), tokens_BT)


def strip_to_stage(model: nn.Module, kind: ModelKind, first: bool, last: bool) -> nn.Module:
    """Drop the submodules other chunks own, by the kind's split points (the backbone was built
    with only this chunk's layers already)."""
    if kind.first_chunk_only is None or kind.last_chunk_only is None:
        raise ValueError(f"the {kind.name} cannot be pipelined: only CALM and the token baseline can")
    if not first:
        for part in kind.first_chunk_only:
            setattr(model, part, None)
    if not last:
        for part in kind.last_chunk_only:
            setattr(model, part, None)
    return model


def _loss_func(output, fields: Sequence[str], loss: torch.Tensor):
    """megatron's loss_func: the tensor to backpropagate and what to report (the loss and the
    output's `fields`). megatron divides the returned tensor in place by the number of
    micro-batches, so the report holds copies."""
    report = {"loss": loss.detach().clone()}
    for name in fields:
        report[name] = getattr(output, name).detach().clone()
    return loss, report


def run_schedule(
    chunks: Sequence[nn.Module],
    micro_batches: Sequence[torch.Tensor],
    forward_only: bool = False,
    report_fields: Sequence[str] = (),
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward) of every micro-batch through megatron's pipeline schedule (1F1B
    with PP > 1, interleaved 1F1B with virtual stages, plain accumulation with PP = 1) over this
    rank's chunks (PipelineStages, or megatron DDP wrappers of them). The gradients of the
    micro-batches' mean loss are left where the wrappers put them (`.main_grad` under megatron
    DDP, else `.grad`); the rank holding the model's last chunk returns one report per
    micro-batch (the loss and the model output's `report_fields`), the others []."""
    def forward_step(data_iterator: Iterator[torch.Tensor], model: nn.Module):
        tokens = next(data_iterator)
        output = model(tokens)
        if not get_attr_wrapped_model(model, "last"):
            return output, None
        return output.loss, partial(_loss_func, output, report_fields)

    micro_batch_size = micro_batches[0].shape[0]
    return list(
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in chunks],  # each chunk reads every micro-batch
            model=list(chunks),
            num_microbatches=len(micro_batches),
            seq_length=get_attr_wrapped_model(chunks[0], "steps"),
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    )


def broadcast_from_last_stage(values: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The last stage's values on every stage of the pipeline (reports, finiteness flags)."""
    if layout.pipeline_parallel == 1:
        return values
    source = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(values, src=source, group=ps.get_pipeline_model_parallel_group())
    return values
