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

from pathlib import Path

import torch

from calm_dist.checkpoint.manager import consolidate_fp32
from calm_dist.checkpoint.reading import (
    CheckpointRef,
    ConversionError,
    check_finite,
    check_shards,
    is_model_parallel,
    merged_model_parallel_weights,
    resolve_checkpoint,
    single_process_config,
    stdout_to_stderr,
)
from calm_dist.checkpoint.reference_reading import is_reference_dir
from calm_dist.pretrained.build import Pretrained, build_for_stage, tokenizer_for
from calm_dist.pretrained.converted import load_converted


def load_checkpoint_model(ref: CheckpointRef, device: str | torch.device = "cpu") -> Pretrained:
    """The model straight from the checkpoint (fp32, eval mode): the reference verification
    compares a converted directory against. Uses the training code's own consolidation
    (`consolidate_fp32`, DeepSpeed's eager path), not the converter's lazy one."""
    check_shards(ref)
    cfg = single_process_config(ref.meta()["config"], source=str(ref.path))
    model = build_for_stage(cfg, device=device)
    if is_model_parallel(ref):
        weights = merged_model_parallel_weights(ref)
    else:
        with stdout_to_stderr():
            weights = consolidate_fp32(ref.checkpoints_dir, ref.tag)
    for name, tensor in weights.items():
        check_finite(name, tensor, ref)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{ref.path} does not fit a {cfg.training.stage} model of its own config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return Pretrained(cfg.training.stage, model.to(device).eval(), cfg, tokenizer_for(cfg))


def load_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", tag: str | None = None) -> Pretrained:
    """A model from a training run's DeepSpeed checkpoint (any ZeRO stage, any training world
    size), read-only: nothing in the checkpoint directory is touched."""
    return load_checkpoint_model(resolve_checkpoint(path, tag), device=device)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """A converted directory (config.json + safetensors) or a training checkpoint, on `device`.

    `device` also decides the attention backend: a model loaded for the CPU gets `sdpa` under
    `auto` even on a GPU node, and a saved `flash_attn` or `te` is refused there (pass the GPU,
    e.g. device="cuda", rather than moving a CPU-loaded model afterwards)."""
    path = Path(path)
    if is_reference_dir(path):
        raise ConversionError(f"{path} is in the reference implementation's format: import it first "
                              f"(calm-convert import-reference {path} OUT), then load OUT")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return load_converted(path, device=device)
    return load_from_checkpoint(path, device=device)
