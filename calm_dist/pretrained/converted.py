"""Load a converted directory (see export.py for its layout) in one call, safetensors only.

    from calm_dist.pretrained.converted import load_converted
    pre = load_converted("exports/calm")      # also what calm_dist.pretrained.load_pretrained does
    pre.model, pre.tokenizer, pre.config, pre.kind
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calm_dist.checkpoint.hf_config import AE_PREFIX, CONFIG_NAME, STAGES, TOKENIZER_NAME, WEIGHTS_NAME, read_hf_config
from calm_dist.checkpoint.reading import ConversionError, single_process_config
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.models.autoencoder_io import load_autoencoder
from calm_dist.pretrained.build import Pretrained, build_for_stage
from calm_dist.weights_file import open_safetensors

def load_converted(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    allow_missing_tokenizer: bool = False,
    dtype: torch.dtype | None = torch.float32,
):
    """A `calm_dist.pretrained.Pretrained` (model in eval mode) from a converted directory, on
    `device`, which also decides the attention backend (calm_dist.pretrained.load_pretrained).

    `dtype`: the model's parameter dtype (default float32, whatever the stored dtype; None keeps
    the stored one). Without tokenizer.json it is an error unless `allow_missing_tokenizer`.
    """
    path = Path(path)
    config = read_hf_config(path)
    stage = STAGES[config["model_type"]]
    cfg = single_process_config(config["calm_dist"], source=str(path / CONFIG_NAME))
    if cfg.training.stage != stage:
        raise ConversionError(f"{path / CONFIG_NAME}: model_type {config['model_type']} contradicts its "
                              f"calm_dist.training.stage {cfg.training.stage}")
    tokenizer = _load_tokenizer(path, allow_missing_tokenizer)

    autoencoder = None
    if stage == "calm" and config.get("ae_path"):
        ae_dir = path / config["ae_path"]  # relative to the directory (an absolute path stays one)
        if not (ae_dir / CONFIG_NAME).is_file():
            raise ConversionError(f"{path}: the referenced autoencoder {ae_dir} (ae_path) is missing")
        autoencoder = load_autoencoder(ae_dir, expected=cfg.autoencoder)
    model = build_for_stage(cfg, autoencoder, device=device)
    load_safetensors_into(model, path / WEIGHTS_NAME, skip_prefix=AE_PREFIX if autoencoder is not None else None)
    if dtype is None:
        dtype = getattr(torch, config.get("torch_dtype", "float32"))
    return Pretrained(stage, model.to(device=device, dtype=dtype).eval(), cfg, tokenizer)


def load_safetensors_into(model: nn.Module, file: Path, skip_prefix: str | None = None) -> None:
    """Copy every tensor of `file` into `model`, one at a time; the names must match exactly
    (those under `skip_prefix` come from elsewhere and must be absent)."""
    # Megatron layers add `_extra_state` entries (FP8 metadata, not weights); DeepSpeed keeps none.
    targets = {name: t for name, t in model.state_dict().items()
               if not name.endswith("._extra_state") and not (skip_prefix and name.startswith(skip_prefix))}
    with open_safetensors(file) as f, torch.no_grad():
        stored = set(f.keys())
        missing, unexpected = sorted(targets.keys() - stored), sorted(stored - targets.keys())
        if missing or unexpected:
            raise ConversionError(f"{file} does not fit the model its config.json describes: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name in stored:
            tensor = f.get_tensor(name)
            if tensor.shape != targets[name].shape:
                raise ConversionError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"expects {tuple(targets[name].shape)}")
            targets[name].copy_(tensor)


def _load_tokenizer(path: Path, allow_missing: bool):
    file = path / TOKENIZER_NAME
    if file.is_file():
        return load_tokenizer(file)
    if allow_missing:
        return None
    raise ConversionError(f"{path} has no {TOKENIZER_NAME}: the converted directory is incomplete (copy the "
                          f"run's tokenizer there as {TOKENIZER_NAME}, or load with allow_missing_tokenizer=True)")
