"""ZeRO-3 specifics applied from outside the model code.

Under ZeRO-3 a parameter is gathered only around the forward of the module that owns it. A tied
table read by another module (the autoencoder's decoder projects onto its input embedding) must
be declared to DeepSpeed as an external parameter of the reading module.

DeepSpeed hooks every module a forward calls: before it (gather), after it (release), and twice in
the backward, each in Python. A backbone layer's attention block and MLP can be one unit each
instead (`mark_gather_blocks`), one gather and one set of hooks for their linears together.
A whole layer cannot: DeepSpeed reduces a unit's gradients from a full backward hook, and megatron
calls its layers with keyword arguments only, so torch would run that hook before any of the
layer's weight gradients exist.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from torch import nn

from calm_dist.models.autoencoder import TiedProjection


def register_tied_weights(model: nn.Module) -> int:
    """Declare every tied read in `model` (after deepspeed.initialize); returns how many."""
    import deepspeed  # lazy: deepspeed picks its accelerator on import, after init_distributed's DS_ACCELERATOR

    register_external_parameter = deepspeed.zero.register_external_parameter

    count = 0
    for module in model.modules():
        if isinstance(module, TiedProjection):
            register_external_parameter(module, module.embedding.weight)
            count += 1
    return count


def mark_gather_blocks(model: nn.Module) -> int:
    """Make each megatron attention block and MLP in `model` a ZeRO-3 leaf module (before
    deepspeed.initialize, which registers the hooks); returns how many. Both are called with their
    input positionally, and that input needs a gradient (it comes from the trainable embedding or
    input projection through the residual stream, and with the local spec through a norm with
    trainable weights), so their full backward hooks wait for the input's gradient, that is for
    every gradient inside them. A unit whose input needed none would have its hook run first."""
    from deepspeed.utils import set_z3_leaf_modules  # lazy: deepspeed picks its accelerator on import

    if not any(isinstance(module, (SelfAttention, MLP)) for module in model.modules()):
        return 0
    return len(set_z3_leaf_modules(model, [SelfAttention, MLP]))
