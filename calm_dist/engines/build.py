"""The engine of the configured regime, built on this rank."""

from __future__ import annotations

import torch

from calm_dist.config.schema import JobConfig
from calm_dist.engines.deepspeed_zero import build_zero_engine
from calm_dist.engines.megatron_3d import build_3d_engine
from calm_dist.engines.protocol import TrainEngine
from calm_dist.parallel.state import ParallelLayout


def build_engine(cfg: JobConfig, layout: ParallelLayout, device: torch.device) -> TrainEngine:
    """This rank's model (its whole self under zero3, its chunks and shards under 3d) in the
    regime's engine, on `device`."""
    if cfg.parallel.regime == "3d":
        return build_3d_engine(cfg, layout, device)
    return build_zero_engine(cfg, layout, device)
