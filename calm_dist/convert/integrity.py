"""`calm-convert verify`: is a checkpoint (or a converted directory) intact?

A checkpoint: every file against the size and sha256 in its manifest, the DeepSpeed/3d shards
readable, its consolidated weights finite. A converted directory: config.json readable and every
tensor of its safetensors files readable and finite.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from calm_dist.checkpoint.hf_config import CONFIG_NAME, WEIGHTS_NAME, read_hf_config
from calm_dist.checkpoint.reading import (
    CheckpointRef,
    ConversionError,
    check_finite,
    check_shards,
    complete_tags,
    consolidated_weights,
    resolve_checkpoint,
    verify_manifest,
)
from calm_dist.weights_file import load_safetensors


def verify_checkpoint_ref(ref: CheckpointRef) -> str:
    """A one-line summary of a verified checkpoint; ConversionError naming what is damaged."""
    started = time.perf_counter()
    manifest = verify_manifest(ref)
    check_shards(ref)
    count = 0
    for name, tensor in consolidated_weights(ref):
        check_finite(name, tensor, ref)
        count += 1
    checked = "every file matches its manifest" if manifest else "no manifest (an older calm-dist): shards readable"
    return f"OK {ref.path}: {checked}, {count} weights finite ({time.perf_counter() - started:.1f} s)"


def verify_converted(path: Path) -> str:
    config = read_hf_config(path)
    files = [path / WEIGHTS_NAME] + ([path / config["ae_path"] / WEIGHTS_NAME] if config.get("ae_path") else [])
    count = 0
    for file in files:
        for name, tensor in load_safetensors(file).items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise ConversionError(f"{file}: weight {name} holds non-finite values (NaN or inf)")
            count += 1
    return f"OK {path}: {len(files)} weight files readable, {count} tensors finite"


def verify_path(path: str | Path, tag: str | None = None, every: bool = False) -> Iterator[tuple[str, bool]]:
    """(line, intact) for the checkpoint(s) or converted directory at `path`. Input that is not a
    checkpoint at all raises ConversionError."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file():
        try:
            yield verify_converted(path), True
        except ValueError as err:
            yield f"DAMAGED {err}", False
        return
    first = resolve_checkpoint(path, None if every else tag)
    tags = complete_tags(first.checkpoints_dir) if every else [first.tag]
    for name in tags:
        ref = CheckpointRef(first.run_dir, first.checkpoints_dir, name)
        try:
            yield verify_checkpoint_ref(ref), True
        except ValueError as err:
            yield f"DAMAGED {err}", False
