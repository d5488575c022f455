"""config.json of a converted directory, in the Hugging Face style of the reference code.

Top level: `model_type` ("calm" | "transformer" | "calm_autoencoder"), the architecture under the
reference's field names (Llama names for the backbone: hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, ...; CALM's patch_size, latent_size,
num_mlp_layers, noise_size, num_samples, beta, ae_path), `torch_dtype`, then `calm_dist` (the
run's full resolved job configuration: the one source of truth when loading) and `source` (where
the weights came from). The architecture fields are for readers outside this project.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from calm_dist.config.rules import query_groups
from calm_dist.config.schema import JobConfig, ModelConfig
from calm_dist.checkpoint.reading import ConversionError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
AUTOENCODER_DIR = "autoencoder"  # the referenced autoencoder of a CALM directory
AE_PREFIX = "autoencoder."  # CALM's frozen autoencoder submodule, in state_dict names

MODEL_TYPES = {"calm": "calm", "baseline": "transformer", "autoencoder": "calm_autoencoder"}
STAGES = {model_type: stage for stage, model_type in MODEL_TYPES.items()}
ARCHITECTURES = {"calm": "CALM", "baseline": "TokenBaseline", "autoencoder": "Autoencoder"}


def _backbone_fields(m: ModelConfig) -> dict:
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": query_groups(m),
        "max_position_embeddings": m.max_position_embeddings,  # model steps: chunks for CALM
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.rms_norm_eps,
        "initializer_range": m.init_std,
        "attention_dropout": m.attention_dropout,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }


def _special_tokens(m: ModelConfig) -> dict:
    return {"pad_token_id": m.pad_token_id, "bos_token_id": m.bos_token_id, "eos_token_id": m.eos_token_id}


def build_hf_config(cfg: JobConfig, saved_config: dict, dtype: str, source: dict, ae_path: str | None) -> dict:
    """config.json for `cfg` (validated); `saved_config` is the run's config as the checkpoint holds it."""
    stage, m = cfg.training.stage, cfg.model
    autoencoder = dataclasses.asdict(cfg.autoencoder)  # its architecture names are the reference's
    if stage == "autoencoder":
        body = {**autoencoder, **_special_tokens(m)}
    elif stage == "baseline":
        body = {**_backbone_fields(m), **_special_tokens(m)}
    else:
        body = {
            **_backbone_fields(m), **_special_tokens(m),
            "head_type": "energy",  # the reference's model_type for this head
            "patch_size": m.patch_size, "latent_size": m.latent_size, "num_mlp_layers": m.num_mlp_layers,
            "noise_size": m.noise_size, "num_samples": m.num_samples, "beta": m.beta,
            "num_target_samples": m.num_target_samples,
            "ae_path": ae_path,  # null: embedded, the weights hold autoencoder.*
            "autoencoder_config": {"model_type": MODEL_TYPES["autoencoder"], **autoencoder},
        }
    return {"model_type": MODEL_TYPES[stage], "architectures": [ARCHITECTURES[stage]], **body,
            "torch_dtype": dtype, "calm_dist": saved_config, "source": source}


def load_config_json(path: Path, not_found: str) -> dict:
    """The config.json of directory `path`; `not_found` says what `path` is not when it has none."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise ConversionError(f"{path} is {not_found}: no {CONFIG_NAME}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{file} holds no JSON object")
    return config


def read_hf_config(path: Path) -> dict:
    """config.json of a converted directory, checked for what loading needs."""
    config = load_config_json(path, "not a converted directory")
    file = path / CONFIG_NAME
    if config.get("model_type") not in STAGES:
        raise ConversionError(f"{file}: model_type {config.get('model_type')!r} is none of {sorted(STAGES)}")
    if not isinstance(config.get("calm_dist"), dict):
        raise ConversionError(f"{file} has no 'calm_dist' section (the job configuration): "
                              "it was not written by calm_dist.convert")
    return config
