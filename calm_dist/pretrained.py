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

from calm_dist.config import load_config, validate
from calm_dist.config.schema import JobConfig


@dataclass
class Pretrained:
    kind: str  # "calm" | "baseline" | "autoencoder"
    model: nn.Module  # in eval mode
    config: JobConfig  # validated, world size 1
    tokenizer: object | None  # calm_dist.data.tokenizer.Tokenizer, when the run named a tokenizer file


def _run_layout(path: Path) -> tuple[Path, Path, str | None]:
    """(run directory, checkpoints directory, tag or None for the newest)."""
    if (path / "checkpoints").is_dir():
        return path, path / "checkpoints", None
    if path.name.startswith("global_step") and (path / "meta.json").is_file():
        return path.parent.parent, path.parent, path.name
    if (path / "latest").is_file() or any(path.glob("global_step*")):
        return path.parent, path, None
    raise FileNotFoundError(
        f"{path} is neither a training run (with checkpoints/), a checkpoints directory, nor a "
        "checkpoint global_stepN: point to what calm_dist.train wrote"
    )


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


def load_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """A model from a training run's DeepSpeed checkpoint (any ZeRO stage)."""
    from calm_dist.training.checkpoint import CheckpointManager, consolidate_fp32

    run_dir, ckpt_dir, tag = _run_layout(Path(path))
    manager = CheckpointManager(ckpt_dir, keep_last=0, rank=0, world_size=1)
    tag = tag or manager.resolve(-1)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint")
    saved = manager.read_meta(tag)["config"]
    from calm_dist.config import config_from_dict

    cfg = validate(config_from_dict({k: v for k, v in saved.items() if k != "derived"}, source=str(ckpt_dir / tag)))
    model = build_for_stage(cfg)
    weights = consolidate_fp32(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # The frozen autoencoder inside CALM is saved too (DeepSpeed keeps frozen parameters).
    if unexpected or missing:
        raise RuntimeError(f"{ckpt_dir / tag} does not fit a {cfg.training.stage} model of its own config: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return Pretrained(cfg.training.stage, model.to(device).eval(), cfg, _tokenizer_for(cfg))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """A converted directory (config.json + safetensors) or a training checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        from calm_dist.convert import load_converted  # the converter's own loader

        return load_converted(path, device=device)
    return load_from_checkpoint(path, device=device)
