"""Checkpoints of the reference implementation (the CALM authors' code) in and out of calm-dist.

    calm-convert import-reference REF_DIR OUT      # reference autoencoder or CALM -> converted directory
    calm-convert export-reference CONVERTED OUT    # converted directory -> what the reference loads

A reference directory is what its `save_pretrained` writes: config.json (`model_type` "autoencoder"
or "energy") and the weights as pytorch_model.bin (read with `torch.load(weights_only=True)`:
tensors only) or model.safetensors, possibly sharded with an index file. A CALM names its
autoencoder directory in `ae_path`; the autoencoder's weights are also inside it (`ae_model.*`).

Import is exact (reference_names.py): every source tensor is used once, copies of tied or
twice-registered tensors must be equal, nothing is invented, and the stored dtype is kept. The
converted directory is checked before it is renamed into place: calm-dist's loader reads it
strictly and mapping its weights back gives the source tensors bit for bit. Nothing is written when
anything is wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from calm_dist.checkpoint.hf_config import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, build_hf_config, read_hf_config
from calm_dist.checkpoint.reading import ConversionError, single_process_config
from calm_dist.checkpoint.reference_names import AE_PREFIX, autoencoder_rules, calm_rules, to_reference
from calm_dist.checkpoint.reference_reading import BIN_NAME, read_reference, reference_model_type
from calm_dist.common.atomic import atomic_directory
from calm_dist.config.loader import config_to_dict
from calm_dist.config.rules import head_blocks, query_groups
from calm_dist.config.schema import AutoencoderConfig, ModelConfig

AE_DIR = "autoencoder"  # the exported CALM's autoencoder, written beside it


# -- import --------------------------------------------------------------------------------------------
def import_reference(src: str | Path, out: str | Path, *, autoencoder: str | Path | None = None,
                     overwrite: bool = False, progress=print) -> Path:
    """A reference directory -> a calm-dist converted directory (config.json, model.safetensors with
    the autoencoder embedded for CALM, tokenizer.json when the source has one)."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists: choose another output or pass --overwrite")
    read = read_reference(src, autoencoder)
    cfg, weights = read.cfg, read.weights
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    tokenizer = next((d / TOKENIZER_NAME for d in (src, *([Path(autoencoder)] if autoencoder else []))
                      if (d / TOKENIZER_NAME).is_file()), None)
    with atomic_directory(out, replace=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
        source = {"reference": str(src.resolve()), "reference_model_type": reference_model_type(src)}
        config = build_hf_config(cfg, config_to_dict(cfg), dtype_name, source, None)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _check_import(tmp, read.rules, read.source, src)
    progress(f"imported {src} ({cfg.training.stage}, {len(weights)} tensors, {dtype_name}) to {out}"
             + ("" if tokenizer else f"; no {TOKENIZER_NAME} in the source: copy the tokenizer there"))
    return out


def _check_import(converted: Path, rules: list, source: dict[str, torch.Tensor], src: Path) -> None:
    """The written directory loads strictly into calm-dist's model, and its weights map back to
    the source tensors bit for bit."""
    # lazy: building the model imports megatron-core (seconds); reading and mapping do not need it
    from calm_dist.pretrained.converted import load_converted

    model = load_converted(converted, allow_missing_tokenizer=True, dtype=None).model
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    back = to_reference(rules, state, str(converted))
    differ = [name for name, tensor in back.items() if name in source and not torch.equal(tensor, source[name])]
    if differ:
        raise ConversionError(f"import check failed: {', '.join(differ[:8])} differ from {src} after the round trip")


# -- export --------------------------------------------------------------------------------------------
def _reference_ae_config(ae: AutoencoderConfig, m: ModelConfig) -> dict[str, Any]:
    return {"model_type": "autoencoder", "ae_dropout": ae.token_dropout, "kl_clamp": ae.kl_clamp,
            "kl_weight": ae.kl_weight, "patch_size": ae.patch_size, "vocab_size": m.vocab_size,
            "hidden_size": ae.hidden_size, "intermediate_size": ae.intermediate_size,
            "num_encoder_layers": ae.num_encoder_layers, "num_decoder_layers": ae.num_decoder_layers,
            "latent_size": ae.latent_size, "hidden_act": "silu", "initializer_range": ae.init_std,
            "rms_norm_eps": ae.rms_norm_eps, "pad_token_id": m.pad_token_id, "bos_token_id": m.bos_token_id,
            "eos_token_id": m.eos_token_id, "tie_word_embeddings": True, "mlp_bias": False}


def _reference_calm_config(m: ModelConfig, ae_path: str) -> dict[str, Any]:
    return {"model_type": "energy", "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads, "num_key_value_heads": query_groups(m),
            "max_position_embeddings": m.max_position_embeddings, "rope_theta": m.rope_theta,
            "rms_norm_eps": m.rms_norm_eps, "initializer_range": m.init_std, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": m.attention_dropout, "mlp_bias": False,
            "tie_word_embeddings": False, "pad_token_id": m.pad_token_id, "bos_token_id": m.bos_token_id,
            "eos_token_id": m.eos_token_id, "patch_size": m.patch_size, "latent_size": m.latent_size,
            "num_samples": m.num_samples, "beta": m.beta, "num_mlp_layers": head_blocks(m),
            "noise_size": m.noise_size, "ae_path": ae_path}


def _write_weights(state: dict[str, torch.Tensor], directory: Path, weights_format: str) -> None:
    if weights_format == "bin":  # copies of one tensor stay one storage: a tied or twice-registered tensor
        torch.save(state, directory / BIN_NAME)
    else:
        # safetensors holds no shared storage: the tied copy is written as a tensor of its own, so that
        # the reference restores it (a save that drops it leaves the reference's copy uninitialised).
        seen: set[int] = set()
        tensors = {}
        for name, tensor in state.items():
            ptr = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.clone() if ptr in seen else tensor.contiguous()
            seen.add(ptr)
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def export_reference(converted: str | Path, out: str | Path, *, weights_format: str = "bin",
                     overwrite: bool = False, progress=print) -> Path:
    """A calm-dist converted directory -> reference directories: the model in OUT and, for CALM,
    its autoencoder in OUT/autoencoder (named by ae_path, an absolute path). `weights_format`:
    "bin" (pytorch_model.bin, what the reference's own scripts write and the only format its CALM
    and its tied autoencoder reload fully) or "safetensors" (autoencoder only)."""
    # lazy: building the model imports megatron-core (seconds); the calm-convert command starts without it
    from calm_dist.pretrained.converted import load_converted

    converted, out = Path(converted), Path(out)
    if weights_format not in ("bin", "safetensors"):
        raise ConversionError(f"weights format {weights_format!r} is neither bin nor safetensors")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists: choose another output or pass --overwrite")
    config = read_hf_config(converted)
    cfg = single_process_config(config["calm_dist"], source=str(converted / CONFIG_NAME))
    stage = cfg.training.stage
    if stage == "baseline":
        raise ConversionError(f"{converted} is a token baseline: the reference format has no such model")
    if stage == "calm" and weights_format != "bin":
        raise ConversionError("the reference cannot load a CALM from safetensors (its head is registered twice): "
                              "export CALM with --weights bin")
    model = load_converted(converted, allow_missing_tokenizer=True, dtype=None).model
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    tokenizer = converted / TOKENIZER_NAME
    with atomic_directory(out, replace=overwrite) as tmp:
        if stage == "autoencoder":
            _write_weights(to_reference(autoencoder_rules(cfg.autoencoder), state, str(converted)), tmp, weights_format)
            (tmp / CONFIG_NAME).write_text(json.dumps(_reference_ae_config(cfg.autoencoder, cfg.model), indent=2) + "\n")
        else:
            ae_state = {k[len(AE_PREFIX):]: v for k, v in state.items() if k.startswith(AE_PREFIX)}
            (tmp / AE_DIR).mkdir()
            _write_weights(to_reference(autoencoder_rules(cfg.autoencoder), ae_state, str(converted)), tmp / AE_DIR, "bin")
            (tmp / AE_DIR / CONFIG_NAME).write_text(json.dumps(_reference_ae_config(cfg.autoencoder, cfg.model), indent=2) + "\n")
            rules = calm_rules(cfg.model, cfg.autoencoder, head_blocks(cfg.model))
            _write_weights(to_reference(rules, state, str(converted)), tmp, "bin")
            ae_path = str((out / AE_DIR).resolve())  # where it will be once renamed into place
            (tmp / CONFIG_NAME).write_text(json.dumps(_reference_calm_config(cfg.model, ae_path), indent=2) + "\n")
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
            if stage == "calm":
                shutil.copyfile(tokenizer, tmp / AE_DIR / TOKENIZER_NAME)
    progress(f"exported {converted} ({stage}) to {out} in the reference format")
    return out
