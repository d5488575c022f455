"""Reading the reference implementation's directories (the CALM authors' code): config.json
(`model_type` "autoencoder" or "energy") and weights as pytorch_model.bin (read with
`torch.load(weights_only=True)`: tensors only) or model.safetensors, possibly sharded with an index
file; a CALM names its autoencoder directory in `ae_path`. `read_reference` turns one into
calm-dist's job configuration and weights, exactly (reference_names.py). Used by
`calm-convert import-reference` and by `training.init_weights`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from calm_dist.checkpoint.hf_config import CONFIG_NAME, WEIGHTS_NAME, load_config_json
from calm_dist.checkpoint.reading import ConversionError
from calm_dist.checkpoint.reference_names import (
    AE_PREFIX_REFERENCE,
    Rule,
    autoencoder_rules,
    calm_rules,
    from_reference,
)
from calm_dist.config.errors import ConfigError
from calm_dist.config.rules import head_blocks
from calm_dist.config.schema import AutoencoderConfig, JobConfig, ModelConfig
from calm_dist.config.validate import validate
from calm_dist.weights_file import load_safetensors

REFERENCE_TYPES = ("autoencoder", "energy")  # the reference's model_type of each model
BIN_NAME = "pytorch_model.bin"
# Settings of the reference's architecture calm-dist's models do not have (they must be off).
_UNSUPPORTED = {"mlp_bias": (False, None), "attention_bias": (False, None), "rope_scaling": (None,)}


# -- reading a reference directory -----------------------------------------------------------------
def is_reference_dir(path: str | Path) -> bool:
    """A directory whose config.json has one of the reference's model types."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("model_type") in REFERENCE_TYPES
    except (ValueError, AttributeError):
        return False


def reference_model_type(path: Path) -> str:
    return _read_config(path)["model_type"]


def _read_config(path: Path) -> dict[str, Any]:
    config = load_config_json(path, "neither a reference nor a calm-dist directory")
    if config.get("model_type") not in REFERENCE_TYPES:
        raise ConversionError(f"{path / CONFIG_NAME}: model_type {config.get('model_type')!r} is not a reference model "
                              f"({' or '.join(REFERENCE_TYPES)}); a calm-dist directory needs no import")
    return config


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: plain tensors and containers; anything else (code, objects) is refused
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends; the message names the refused global
        raise ConversionError(f"{file} is not a plain tensor file: refused by torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); only state dicts "
                              "of tensors are read") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConversionError(f"{file} holds no state dict of tensors")
    return state


def read_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a reference directory: .bin or safetensors, one file or sharded with an index."""
    for index_name, loader in (("model.safetensors.index.json", load_safetensors), (f"{BIN_NAME}.index.json", _load_bin)):
        index = path / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(loader(path / name))
            return state
    if (path / WEIGHTS_NAME).is_file():
        return load_safetensors(path / WEIGHTS_NAME)
    if (path / BIN_NAME).is_file():
        return _load_bin(path / BIN_NAME)
    raise ConversionError(f"{path} has no weights ({WEIGHTS_NAME}, {BIN_NAME} or a sharded index)")


# -- configs ---------------------------------------------------------------------------------------------
def _require(config: dict, keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise ConversionError(f"{where / CONFIG_NAME} lacks {', '.join(missing)}")


def _check_supported(config: dict, where: Path) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where / CONFIG_NAME}: hidden_act {config['hidden_act']!r}; calm-dist's models use silu")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise ConversionError(f"{where / CONFIG_NAME}: {key}={config[key]!r} is not supported by calm-dist's models")


def autoencoder_config(config: dict, where: Path) -> AutoencoderConfig:
    """calm-dist's autoencoder settings from a reference autoencoder config.json."""
    _require(config, ("vocab_size", "patch_size", "latent_size", "hidden_size", "intermediate_size",
                      "num_encoder_layers", "num_decoder_layers"), where)
    _check_supported(config, where)
    if config.get("tie_word_embeddings", True) is not True:
        raise ConversionError(f"{where / CONFIG_NAME}: an autoencoder without tied embeddings is not supported")
    dropout = float(config.get("ae_dropout", 0.15))
    return AutoencoderConfig(
        vocab_size=int(config["vocab_size"]), patch_size=int(config["patch_size"]), latent_size=int(config["latent_size"]),
        hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
        num_encoder_layers=int(config["num_encoder_layers"]), num_decoder_layers=int(config["num_decoder_layers"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), init_std=float(config.get("initializer_range", 0.02)),
        token_dropout=dropout, latent_dropout=dropout, kl_weight=float(config.get("kl_weight", 1e-3)),
        kl_clamp=float(config.get("kl_clamp", 0.5)),
        mask_token_id=0,  # the reference masks tokens with id 0 (calm-dist's default is PAD)
    )


def calm_model_config(config: dict, ae_config: dict, where: Path) -> ModelConfig:
    """calm-dist's CALM settings from a reference (`energy`) config.json."""
    _require(config, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "patch_size", "latent_size"), where)
    _check_supported(config, where)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    layers = int(config["num_hidden_layers"])
    defaults = ModelConfig()
    return replace(
        defaults, vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_layers=layers, num_attention_heads=heads,
        num_query_groups=0 if kv_heads == heads else kv_heads,
        max_position_embeddings=int(config.get("max_position_embeddings", defaults.max_position_embeddings)),
        rope_theta=float(config.get("rope_theta", defaults.rope_theta)),
        rms_norm_eps=float(config.get("rms_norm_eps", defaults.rms_norm_eps)),
        init_std=float(config.get("initializer_range", defaults.init_std)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        patch_size=int(config["patch_size"]), latent_size=int(config["latent_size"]),
        num_mlp_layers=int(config.get("num_mlp_layers") or max(1, layers // 4)),
        noise_size=int(config.get("noise_size", defaults.noise_size)),
        num_samples=int(config.get("num_samples", defaults.num_samples)), beta=float(config.get("beta", defaults.beta)),
        **_special_ids(config, where, fallback=ae_config),
    )


def _special_ids(config: dict, where: Path, fallback: dict | None = None) -> dict[str, int]:
    """PAD, BOS and EOS ids; a CALM config without them takes its autoencoder's (one tokenizer)."""
    ids = {k: config.get(k, (fallback or {}).get(k)) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    absent = [k for k, v in ids.items() if v is None]
    if absent:
        raise ConversionError(f"{where / CONFIG_NAME} names no {', '.join(absent)}")
    return {k: int(v) for k, v in ids.items()}


def _job_config(stage: str, model: ModelConfig, ae: AutoencoderConfig, where: Path) -> JobConfig:
    """A single-process job configuration for the imported model, validated."""
    cfg = JobConfig()
    steps = model.max_position_embeddings if stage == "calm" else cfg.data.seq_length // model.patch_size
    seq_length = min(cfg.data.seq_length, steps * model.patch_size)
    cfg = replace(cfg, model=model, autoencoder=replace(ae, vocab_size=model.vocab_size),
                  data=replace(cfg.data, seq_length=seq_length),
                  training=replace(cfg.training, stage=stage, autoencoder_path=""))
    try:
        return validate(cfg, world_size=1)
    except ConfigError as err:
        raise ConversionError(f"{where / CONFIG_NAME} describes a model calm-dist cannot build: {err}") from None


def _autoencoder_dir(calm_dir: Path, config: dict, override: str | Path | None) -> Path:
    if override:
        return Path(override)
    ae_path = config.get("ae_path")
    if not ae_path:
        raise ConversionError(f"{calm_dir / CONFIG_NAME} names no ae_path: pass the autoencoder's directory "
                              "(--autoencoder DIR)")
    ae_dir = Path(ae_path)
    if not ae_dir.is_absolute() and not ae_dir.is_dir():
        ae_dir = calm_dir / ae_dir  # relative to the CALM directory when not to the current one
    if not (ae_dir / CONFIG_NAME).is_file():
        raise ConversionError(f"{calm_dir / CONFIG_NAME}: its autoencoder (ae_path {ae_path}) is missing: copy it "
                              "there or pass its directory (--autoencoder DIR)")
    return ae_dir


@dataclass(frozen=True)
class ReferenceModel:
    """A reference directory read into calm-dist's terms."""

    cfg: JobConfig  # validated, single process
    weights: dict[str, torch.Tensor]  # calm-dist's names
    rules: list[Rule]  # the mapping, both ways
    source: dict[str, torch.Tensor]  # the reference's tensors as read (for checks against them)


def read_reference(src: str | Path, autoencoder: str | Path | None = None) -> ReferenceModel:
    """A reference directory in calm-dist's terms, checked exactly (reference_names.py)."""
    src = Path(src)
    config = _read_config(src)
    if config["model_type"] == "autoencoder":
        ae = autoencoder_config(config, src)
        model = replace(ModelConfig(), vocab_size=ae.vocab_size, patch_size=ae.patch_size, latent_size=ae.latent_size,
                        **_special_ids(config, src))
        cfg = _job_config("autoencoder", model, ae, src)
        rules = autoencoder_rules(cfg.autoencoder)
    else:
        ae_dir = _autoencoder_dir(src, config, autoencoder)
        ae_config = _read_config(ae_dir)
        if ae_config["model_type"] != "autoencoder":
            raise ConversionError(f"{ae_dir} (ae_path) holds a {ae_config['model_type']!r} model, not an autoencoder")
        model = calm_model_config(config, ae_config, src)
        cfg = _job_config("calm", model, autoencoder_config(ae_config, ae_dir), src)
        rules = calm_rules(cfg.model, cfg.autoencoder, head_blocks(cfg.model))
    source = read_reference_weights(src)
    if config["model_type"] == "energy" and not any(name.startswith(AE_PREFIX_REFERENCE) for name in source):
        # A CALM saved without its frozen autoencoder: take it from ae_path.
        source.update((AE_PREFIX_REFERENCE + k, v) for k, v in read_reference_weights(ae_dir).items())
    return ReferenceModel(cfg, from_reference(rules, source, str(src)), rules, source)


def reference_autoencoder(path: str | Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """The autoencoder of a reference directory: the directory itself for an autoencoder, the
    frozen one inside (`ae_model.*`, else its ae_path) for a CALM; config and calm-dist weights."""
    read = read_reference(path)
    if read.cfg.training.stage == "autoencoder":
        return read.cfg.autoencoder, read.weights
    prefix = "autoencoder."
    return read.cfg.autoencoder, {k[len(prefix):]: v for k, v in read.weights.items() if k.startswith(prefix)}
