"""ZeRO-3 specifics applied from outside the model code.

Under ZeRO-3 a parameter is gathered only around the forward of the module that owns it. A tied
table read by another module (the autoencoder's decoder projects onto its input embedding) must
be declared to DeepSpeed as an external parameter of the reading module.

DeepSpeed hooks every module a forward calls: before it (gather), after it (release), and twice in
the backward, each in Python. A whole backbone layer, or its attention block and MLP, can be one
unit instead (`mark_gather_units`): one gather and one set of hooks for everything inside. A unit's
gradients are reduced from a full backward hook on it, which must wait for the unit's input
gradient: megatron calls its layers with keyword arguments only, hidden from that hook, so the
backbone's layers are `PositionalInputLayer`s.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from torch import nn

from calm_dist.models.autoencoder import TiedProjection
from calm_dist.models.backbone import PositionalInputLayer


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


# What each parallel.zero3_gather unit is made of (megatron classes; "linear": DeepSpeed's own).
_UNIT_CLASSES = {"layer": (PositionalInputLayer,), "block": (SelfAttention, MLP)}
UNIT_NAMES = {"layer": "backbone layers", "block": "attention blocks and MLPs"}


def mark_gather_units(model: nn.Module, unit: str) -> int:
    """Make each of `model`'s modules of the `unit` kind ("layer", "block"; "linear" marks none) a
    ZeRO-3 leaf module (before deepspeed.initialize, which registers the hooks); returns how many.
    Each is called with its input positionally (a layer through PositionalInputLayer), and that
    input needs a gradient (it comes from the trainable embedding or input projection through the
    residual stream), so its full backward hook waits for the input's gradient, that is for every
    gradient inside the unit. A unit whose input needed none would have its hook run first."""
    from deepspeed.utils import set_z3_leaf_modules  # lazy: deepspeed picks its accelerator on import

    classes = _UNIT_CLASSES.get(unit, ())
    if not classes or not any(isinstance(module, classes) for module in model.modules()):
        return 0
    units = set_z3_leaf_modules(model, list(classes))
    for module in units:
        module.register_forward_pre_hook(_refuse_an_input_without_gradient)
    return len(units)


def _refuse_an_input_without_gradient(module: nn.Module, args: tuple) -> None:
    """A unit's gradients would be reduced before they exist (DeepSpeed's cryptic "The size of
    tensor a (0) must match ..." at the first backward): say what is wrong instead."""
    if module.training and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) \
            and not args[0].requires_grad:
        raise ValueError(
            f"ZeRO-3 unit {type(module).__name__} got an input that needs no gradient (a frozen "
            "embedding or input projection?): DeepSpeed would reduce its gradients before they exist. "
            "Use parallel.zero3_gather=linear, or make the input trainable")
