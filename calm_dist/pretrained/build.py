"""What a loaded model is (`Pretrained`) and how an untrained one of a run's kind is built."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calm_dist.config.schema import JobConfig
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.models.backbone import BackboneOptions
from calm_dist.models.kinds import model_kind
from calm_dist.parallel.state import ensure_model_parallel


@dataclass
class Pretrained:
    kind: str  # "calm" | "baseline" | "autoencoder"
    model: nn.Module  # in eval mode
    config: JobConfig  # validated, world size 1
    tokenizer: object | None  # calm_dist.data.tokenizer.Tokenizer, when the run named a tokenizer file


def tokenizer_for(cfg: JobConfig):
    """The run's tokenizer, or None when its file cannot be loaded (the caller says what that costs)."""
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError, OSError):
        return None


def build_for_stage(cfg: JobConfig, autoencoder: nn.Module | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """An untrained model of the run's kind (weights are loaded afterwards); CALM gets
    `autoencoder` when given (a converted directory may keep it beside), else a fresh one.
    `device`: where it will run, which decides the attention backend (None: a GPU when there is one)."""
    ensure_model_parallel()
    options = None if device is None else BackboneOptions(device_type=torch.device(device).type)
    return model_kind(cfg.training.stage).build(cfg, options, autoencoder)
