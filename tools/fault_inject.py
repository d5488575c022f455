"""Run calm-train with a fault planted in the model (for the fault tests, tests/test_faults.py).

    torchrun --nproc_per_node 2 tools/fault_inject.py --nan-grad-at 3 -- --config tiny_autoencoder ...
    python tools/fault_inject.py --nan-weights-at 2 -- --config tiny_autoencoder ...

--nan-grad-at N    the N-th training forward (1-based, counted per rank) returns finite outputs, but
                   the gradients flowing back through its embeddings are NaN: a finite loss with
                   non-finite gradients, which the trainer must never apply.
--nan-weights-at N before the N-th training forward, the weights of the first embedding become NaN
                   on this rank (what a divergence leaves): such a state must never be saved.

Everything after "--" goes to calm-train unchanged. The fault is planted by wrapping the model
factory; the engines, the data and the checkpoints are the real ones.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def plant(model: nn.Module, nan_grad_at: int, nan_weights_at: int) -> nn.Module:
    count = [0]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]

    def before_forward(module, args):
        if not module.training:
            return
        count[0] += 1
        if count[0] == nan_weights_at:
            weight = embeddings[0].weight
            with torch.no_grad():
                for data in (getattr(weight, "ds_tensor", None), weight.data):
                    if data is not None and data.numel():
                        data.fill_(float("nan"))

    def after_embedding(module, args, output):
        if module.training and count[0] == nan_grad_at:
            return _NanGradient.apply(output)
        return output

    model.register_forward_pre_hook(before_forward)
    for embedding in embeddings:
        embedding.register_forward_hook(after_embedding)
    return model


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="fault_inject", description=__doc__.splitlines()[0])
    parser.add_argument("--nan-grad-at", type=int, default=0)
    parser.add_argument("--nan-weights-at", type=int, default=0)
    args = parser.parse_args(argv[:cut])

    from calm_dist import train
    from calm_dist.engines import model_build as stages

    build = stages.build_model

    def build_with_fault(*a, **kw):
        return plant(build(*a, **kw), args.nan_grad_at, args.nan_weights_at)

    stages.build_model = build_with_fault
    return train.main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
