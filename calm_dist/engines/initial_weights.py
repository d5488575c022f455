"""`training.init_weights`: start a run from saved weights instead of a random initialisation.

The source is what `calm-convert convert` writes (a directory with model.safetensors), a bare
.safetensors file keyed like the single-process model's state dict, or a directory of the reference
implementation (imported on the fly, exactly as `calm-convert import-reference` does). The 3d regime takes each
rank's tensor/pipeline shard of it. The frozen autoencoder always comes from
training.autoencoder_path, so `autoencoder.*` tensors in the source are ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from calm_dist.checkpoint.reference_reading import is_reference_dir, read_reference
from calm_dist.parallel.sharding import shard_state_dict
from calm_dist.weights_file import load_safetensors

_SKIPPED_PREFIX = "autoencoder."
logger = logging.getLogger(__name__)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir() and is_reference_dir(path):  # the reference implementation's directory, imported on the fly
        weights = read_reference(path).weights
        return {k: v for k, v in weights.items() if not k.startswith(_SKIPPED_PREFIX)}
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"training.init_weights: {file} does not exist; point it at a calm-convert output directory "
            "or a .safetensors file"
        )
    return {k: v for k, v in load_safetensors(file).items() if not k.startswith(_SKIPPED_PREFIX)}


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
