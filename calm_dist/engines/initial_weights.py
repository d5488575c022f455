"""`training.init_weights`: start a run from saved weights instead of a random initialisation.

The source is what `calm-convert convert` writes (a directory with model.safetensors), a bare
.safetensors file keyed like the single-process model's state dict, or a directory of the reference
implementation (imported on the fly, exactly as `calm-convert import-reference` does). The 3d regime takes each
rank's tensor/pipeline shard of it. The frozen autoencoder always comes from
training.autoencoder_path, so `autoencoder.*` tensors in the source are ignored.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from calm_dist.checkpoint.reference_reading import is_reference_dir, read_reference
from calm_dist.models.init import whole
from calm_dist.parallel.sharding import shard_state_dict
from calm_dist.weights_file import load_safetensors, open_safetensors

_SKIPPED_PREFIX = "autoencoder."
logger = logging.getLogger(__name__)


def _weights_file(path: Path) -> Path:
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"training.init_weights: {file} does not exist; point it at a calm-convert output directory "
            "or a .safetensors file"
        )
    return file


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir() and is_reference_dir(path):  # the reference implementation's directory, imported on the fly
        weights = read_reference(path).weights
        return {k: v for k, v in weights.items() if not k.startswith(_SKIPPED_PREFIX)}
    return {k: v for k, v in load_safetensors(_weights_file(path)).items() if not k.startswith(_SKIPPED_PREFIX)}


def load_initial_weights(model: nn.Module, path: str | Path, layer_offset: int = 0, tp_rank: int = 0,
                         tensor_parallel: int = 1) -> int:
    """Copy this rank's part of the weights at `path` into `model` (a whole model, or a pipeline
    chunk whose first layer is global layer `layer_offset`); returns how many tensors. Every
    weight of the model must be found, with its shape."""
    full = read_weights(path)
    own = model.state_dict()
    keys = [k for k in own if not k.startswith(_SKIPPED_PREFIX)]
    try:
        shard = shard_state_dict(full, keys, layer_offset, tp_rank, tensor_parallel)
    except KeyError as err:
        raise ValueError(f"training.init_weights {path}: not weights of this model ({err.args[0]})") from None
    wrong = [f"{k}: {tuple(v.shape)} vs the model's {tuple(own[k].shape)}" for k, v in shard.items()
             if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"training.init_weights {path}: shapes do not match the model: {wrong[:3]}")
    model.load_state_dict(shard, strict=False)
    source = " (the reference implementation's format, imported on the fly)" if is_reference_dir(path) else ""
    logger.info("training.init_weights: %d tensors from %s%s", len(shard), path, source)
    return len(shard)


@contextmanager
def _tensor_by_tensor(path: str | Path) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    """The source's shapes by name, and a reader of one tensor: a safetensors file is read a tensor
    at a time (the reference implementation's format is imported whole)."""
    path = Path(path)
    if path.is_dir() and is_reference_dir(path):
        full = read_weights(path)
        yield {k: tuple(v.shape) for k, v in full.items()}, full.__getitem__
        return
    with open_safetensors(_weights_file(path)) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(_SKIPPED_PREFIX)}
        yield shapes, f.get_tensor


def load_initial_weights_partitioned(model: nn.Module, path: str | Path, rank: int) -> int:
    """`load_initial_weights` for a model built partitioned (ZeRO-3's zero.Init): every name and
    shape is checked first, then one module's parameters at a time are made whole and rank 0 copies
    them from the file, tensor by tensor, so that no rank ever holds the whole model. Collective."""
    params = {name: p for name, p in model.named_parameters() if not name.startswith(_SKIPPED_PREFIX)}
    buffers = [k for k in model.state_dict() if k not in params and not k.startswith(_SKIPPED_PREFIX)
               and not k.endswith("._extra_state")]
    with _tensor_by_tensor(path) as (shapes, read):
        missing = [k for k in [*params, *buffers] if k not in shapes]
        if missing:
            raise ValueError(f"training.init_weights {path}: not weights of this model ({missing[:3]} missing)")
        wrong = [f"{k}: {shapes[k]} vs the model's {tuple(p.ds_shape)}" for k, p in params.items()
                 if shapes[k] != tuple(getattr(p, "ds_shape", p.shape))]
        if wrong:
            raise ValueError(f"training.init_weights {path}: shapes do not match the model: {wrong[:3]}")
        for prefix, module in model.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
            own = [(name, p) for name, p in own if name in params]
            if not own:
                continue
            with whole(p for _, p in own), torch.no_grad():
                if rank == 0:  # rank 0's values are the ones kept
                    for name, p in own:
                        p.copy_(read(name))
        model.load_state_dict({k: read(k) for k in buffers}, strict=False)
    logger.info("training.init_weights: %d tensors from %s, one module at a time", len(params) + len(buffers), path)
    return len(params) + len(buffers)
