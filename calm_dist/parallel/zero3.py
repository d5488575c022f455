"""ZeRO-3 specifics applied from outside the model code.

Under ZeRO-3 a parameter is gathered only around the forward of the module that owns it. A tied
table read by another module (the autoencoder's decoder projects onto its input embedding) must
be declared to DeepSpeed as an external parameter of the reading module.
"""

from __future__ import annotations

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
