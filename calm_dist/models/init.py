"""Weight initialisation shared by every calm-dist module (CALM.md §9.2).

Each module initialises its own children in its constructor; there is deliberately no global
init pass, so nothing can overwrite the energy head's zero-initialised output layer or a loaded
autoencoder (CALM.md §8.5).

A model may be built partitioned (DeepSpeed ZeRO-3's `zero.Init`): each module's parameters are
split across the ranks the moment its constructor returns, so a parent that initialises its
children's weights must see them whole first (`whole`). Every rank runs the same initialisation
on the same random stream, so the weights equal an unpartitioned build's, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    """A parameter split across ranks by DeepSpeed ZeRO-3 (it then carries a `ds_id`)."""
    return hasattr(param, "ds_id")


@contextmanager
def whole(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """The parameters whole inside the block; rank 0's values are kept when it ends. A no-op for
    parameters that are not partitioned. Collective when they are: every rank must enter."""
    params = list(params)
    if any(is_partitioned(p) for p in params):
        import deepspeed  # lazy: only a partitioned build has DeepSpeed parameters

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        context = nullcontext()
    with context:
        yield


def init_llama_(module: nn.Module, std: float) -> None:
    """Normal(0, std) for every Linear and Embedding weight, zero biases, unit norm weights."""
    for sub in module.modules():
        with whole(sub.parameters(recurse=False)):
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                nn.init.normal_(sub.weight, mean=0.0, std=std)
                if getattr(sub, "bias", None) is not None:
                    nn.init.zeros_(sub.bias)
            elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)):
                if sub.weight is not None:
                    nn.init.ones_(sub.weight)
                if getattr(sub, "bias", None) is not None:
                    nn.init.zeros_(sub.bias)


class NormalEmbedding(nn.Embedding):
    """An embedding table drawn from Normal(0, std) inside its own constructor, so that a
    partitioned build never has to gather it again afterwards (for CALM-XL that gather was the
    construction's peak: a 1.2 GiB table plus the collective's buffer). torch's Normal(0, 1) draw
    still comes first and is overwritten: the same random numbers in the same order as drawing
    Normal(0, std) right after the constructor, so the weights for a seed do not change."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        super().__init__(num_embeddings, embedding_dim)
        nn.init.normal_(self.weight, mean=0.0, std=std)
