"""Save and load a trained autoencoder: `config.json` + `model.safetensors` in one directory.

Stage 1 writes it at the end of training; stage 2 (`training.autoencoder_path`) reads it and
freezes it inside CALM. Weights are safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from calm_dist.common.atomic import atomic_directory
from calm_dist.config.schema import AutoencoderConfig
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.weights_file import load_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_autoencoder(state_dict: dict[str, torch.Tensor], cfg: AutoencoderConfig, out_dir: str | Path) -> Path:
    """Write atomically: a temporary sibling directory renamed into place when complete (an older
    export there is replaced only then)."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps({"model_type": "calm_autoencoder", **dataclasses.asdict(cfg)},
                                                  indent=2))
    return out_dir


def read_autoencoder_config(path: str | Path) -> AutoencoderConfig:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved autoencoder (no {CONFIG_NAME}): train one with "
            "training.stage=autoencoder and point training.autoencoder_path at its output_dir/autoencoder"
        )
    fields = json.loads(config_file.read_text())
    fields.pop("model_type", None)
    known = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    return AutoencoderConfig(**{k: v for k, v in fields.items() if k in known})


def check_autoencoder_matches(saved: AutoencoderConfig, expected: AutoencoderConfig, path: Path) -> None:
    """The architecture fields must agree; regularisation settings of stage 1 may differ."""
    arch = ("vocab_size", "patch_size", "latent_size", "hidden_size", "intermediate_size",
            "num_encoder_layers", "num_decoder_layers")
    diffs = [f"autoencoder.{f}: saved {getattr(saved, f)} vs config {getattr(expected, f)}"
             for f in arch if getattr(saved, f) != getattr(expected, f)]
    if diffs:
        raise ValueError(f"the autoencoder at {path} does not match this config: " + "; ".join(diffs))


def load_autoencoder(path: str | Path, expected: AutoencoderConfig | None = None) -> Autoencoder:
    path = Path(path)
    cfg = read_autoencoder_config(path)
    if expected is not None:
        check_autoencoder_matches(cfg, expected, path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
    model = Autoencoder(cfg)
    model.load_state_dict(load_safetensors(weights), strict=True)
    return model
