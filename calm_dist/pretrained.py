"""Load a trained model for evaluation or generation, in one call, in a single process.

    from calm_dist.pretrained import load_pretrained
    pre = load_pretrained("runs/quickstart/calm")     # a training run directory
    pre.model, pre.tokenizer, pre.config, pre.kind     # kind: calm | baseline | autoencoder

Accepted: a training run directory (its newest complete checkpoint is consolidated on the fly, on
CPU, through DeepSpeed's `zero_to_fp32`), a run's `checkpoints/` directory, or one checkpoint
`checkpoints/global_stepN`. Converted directories (safetensors) are read by the converter's
loader when present. Nothing is unpickled except DeepSpeed's own shard files, read by DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from calm_dist.config.schema import JobConfig


@dataclass
class Pretrained:
    kind: str  # "calm" | "baseline" | "autoencoder"
    model: nn.Module  # in eval mode
    config: JobConfig  # validated, world size 1
    tokenizer: object | None  # calm_dist.data.tokenizer.Tokenizer, when the run named a tokenizer file


def _tokenizer_for(cfg: JobConfig):
    from calm_dist.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError, OSError):
        return None


def build_for_stage(cfg: JobConfig, autoencoder: nn.Module | None = None) -> nn.Module:
    """An untrained model of the run's kind (weights are loaded afterwards)."""
    from calm_dist.models.autoencoder import Autoencoder
    from calm_dist.models.baseline import TokenBaseline
    from calm_dist.models.calm import CALM
    from calm_dist.parallel.state import ensure_model_parallel

    ensure_model_parallel()
    stage = cfg.training.stage
    if stage == "autoencoder":
        return Autoencoder(cfg.autoencoder)
    if stage == "baseline":
        return TokenBaseline(cfg.model)
    return CALM(cfg.model, autoencoder if autoencoder is not None else Autoencoder(cfg.autoencoder))


def load_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", tag: str | None = None) -> Pretrained:
    """A model from a training run's DeepSpeed checkpoint (any ZeRO stage, any training world
    size), read-only: nothing in the checkpoint directory is touched."""
    from calm_dist.convert.source import load_checkpoint_model, resolve_checkpoint

    return load_checkpoint_model(resolve_checkpoint(path, tag), device=device)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """A converted directory (config.json + safetensors) or a training checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        from calm_dist.convert import load_converted  # the converter's own loader

        return load_converted(path, device=device)
    return load_from_checkpoint(path, device=device)
