"""The training side of the model kinds (`calm_dist.models.kinds`): CALM's frozen autoencoder
comes from `training.autoencoder_path`; the backbone's options from the parallel config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from calm_dist.config.schema import JobConfig
from calm_dist.models.autoencoder_io import load_autoencoder
from calm_dist.models.backbone import BackboneOptions
from calm_dist.models.kinds import CALM_KIND, model_kind


def build_model(cfg: JobConfig, backbone_options: BackboneOptions | None = None) -> nn.Module:
    """The stage's model; `backbone_options` (which layers, recompute) default to the config's
    activation recomputation over the whole backbone."""
    kind = model_kind(cfg.training.stage)
    if backbone_options is None:
        backbone_options = BackboneOptions(recompute=cfg.parallel.activation_recompute)
    autoencoder = None
    if kind is CALM_KIND:
        if not cfg.training.autoencoder_path:
            raise ValueError(
                "training.autoencoder_path is empty: stage calm needs a trained autoencoder "
                "(run stage autoencoder first; it writes <output_dir>/autoencoder)"
            )
        autoencoder = load_autoencoder(Path(cfg.training.autoencoder_path), expected=cfg.autoencoder)
    return kind.build(cfg, backbone_options, autoencoder)
