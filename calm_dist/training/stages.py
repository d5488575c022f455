"""What differs between the three training stages: the model, its inputs and its metrics.

- autoencoder: blocks of tokens cut into K-token chunks; loss K*CE + beta*KLclip (CALM.md §1.2).
- calm: blocks of S + 1 chunks; energy loss against the frozen autoencoder's posterior (§2).
- baseline: blocks of T + 1 tokens; next-token cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calm_dist.config.schema import JobConfig
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.autoencoder_io import load_autoencoder
from calm_dist.models.backbone import BackboneOptions
from calm_dist.models.baseline import TokenBaseline
from calm_dist.models.calm import CALM


def build_model(cfg: JobConfig, backbone_options: BackboneOptions | None = None) -> nn.Module:
    """The stage's model; `backbone_options` (which layers, recompute) default to the config's
    activation recomputation over the whole backbone."""
    stage = cfg.training.stage
    if backbone_options is None:
        backbone_options = BackboneOptions(recompute=cfg.parallel.activation_recompute)
    if stage == "autoencoder":
        return Autoencoder(cfg.autoencoder)
    if stage == "baseline":
        return TokenBaseline(cfg.model, backbone_options=backbone_options)
    if not cfg.training.autoencoder_path:
        raise ValueError(
            "training.autoencoder_path is empty: stage calm needs a trained autoencoder "
            "(run stage autoencoder first; it writes <output_dir>/autoencoder)"
        )
    autoencoder = load_autoencoder(Path(cfg.training.autoencoder_path), expected=cfg.autoencoder)
    return CALM(cfg.model, autoencoder, backbone_options=backbone_options)


def model_inputs(cfg: JobConfig, tokens_BT: torch.Tensor) -> torch.Tensor:
    """The autoencoder reads chunks (B, C, K); the language models read token blocks."""
    if cfg.training.stage == "autoencoder":
        k = cfg.autoencoder.patch_size
        return tokens_BT.reshape(tokens_BT.shape[0], -1, k)
    return tokens_BT


def step_metrics(cfg: JobConfig, out) -> dict[str, float]:
    """Scalars to log for one micro-batch (besides the loss)."""
    stage = cfg.training.stage
    if stage == "autoencoder":
        return {"ce": out.ce.item(), "kl": out.kl.item(), "acc": out.accuracy.item(), "sigma": out.sigma_mean.item()}
    if stage == "calm":
        return {"fid": out.fidelity.item(), "div": out.diversity.item(), "cos": out.state_cosine.item()}
    return {}

