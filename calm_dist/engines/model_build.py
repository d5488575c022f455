"""The training side of the model kinds (`calm_dist.models.kinds`): CALM's frozen autoencoder
comes from `training.autoencoder_path` (calm-dist's or the reference implementation's format); the
backbone's options from the parallel config."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

from torch import nn

from calm_dist.checkpoint.reference_reading import is_reference_dir, reference_autoencoder
from calm_dist.config.schema import JobConfig
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.autoencoder_io import check_autoencoder_matches, load_autoencoder
from calm_dist.models.backbone import BackboneOptions
from calm_dist.models.kinds import CALM_KIND, model_kind


def build_model(cfg: JobConfig, backbone_options: BackboneOptions | None = None,
                construction: Callable[[], ContextManager] = nullcontext) -> nn.Module:
    """The stage's model; `backbone_options` (which layers, recompute) default to the config's
    activation recomputation over the whole backbone. The model is constructed inside
    `construction()` (DeepSpeed's partitioned construction, for one); CALM's frozen autoencoder is
    read from its file before, outside it."""
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
        autoencoder = _frozen_autoencoder(Path(cfg.training.autoencoder_path), cfg)
    with construction():
        return kind.build(cfg, backbone_options, autoencoder)


def _frozen_autoencoder(path: Path, cfg: JobConfig) -> Autoencoder:
    """A saved autoencoder (stage 1's output or a converted directory), or one in the reference
    implementation's format (an autoencoder or a CALM directory, imported on the fly)."""
    if not is_reference_dir(path):
        return load_autoencoder(path, expected=cfg.autoencoder)
    ae_cfg, weights = reference_autoencoder(path)
    check_autoencoder_matches(ae_cfg, cfg.autoencoder, path)
    autoencoder = Autoencoder(ae_cfg)
    autoencoder.load_state_dict(weights, strict=True)
    return autoencoder
