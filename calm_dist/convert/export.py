"""ZeRO checkpoint -> a self-contained, portable directory (`calm-convert convert`).

Layout of the output directory:

    config.json          HF style (see hf_config.py): model_type, the reference's field names,
                         torch_dtype, calm_dist (the full job config), source (checkpoint, tag, step)
    model.safetensors    the weights in the chosen dtype, keyed like the model's state_dict
    tokenizer.json       the run's tokenizer (data.tokenizer)
    autoencoder/         CALM with the autoencoder referenced only: config.json + model.safetensors
                         as stage 1 writes them (float32), usable as training.autoencoder_path;
                         config.json then says "ae_path": "autoencoder" and model.safetensors holds
                         no autoencoder.* tensors. Embedded (the default): "ae_path": null and the
                         frozen autoencoder sits in model.safetensors under autoencoder.*, as in the
                         checkpoint.

The directory is written under a temporary sibling name and renamed into place only after it is
complete and, unless told otherwise, verified: a failed or interrupted conversion leaves nothing
under the output name. Memory: one copy of the weights in the output dtype while writing (the
optimizer shards are memory-mapped); verification adds two fp32 models.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from calm_dist.common.atomic import atomic_directory
from calm_dist.config.schema import JobConfig
from calm_dist.checkpoint.hf_config import (
    AE_PREFIX,
    AUTOENCODER_DIR,
    CONFIG_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    build_hf_config,
)
from calm_dist.checkpoint.reading import (
    CheckpointRef,
    ConversionError,
    check_finite,
    check_shards,
    consolidated_weights,
    resolve_checkpoint,
    single_process_config,
    verify_manifest,
)
from calm_dist.convert.verify import verify_conversion
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.models.autoencoder_io import save_autoencoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

_started = [time.perf_counter()]  # reset by each conversion


def progress(message: str) -> None:
    print(f"calm-convert [{time.perf_counter() - _started[0]:6.1f}s] {message}", file=sys.stderr, flush=True)


def dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype in names:
            return names[dtype]
    name = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    dtype: str | torch.dtype = "float32",
    embed_autoencoder: bool = True,
    verify: bool = True,
    *,
    tokenizer: str | Path | None = None,
    allow_missing_tokenizer: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert one checkpoint of a training run (`latest`, or `tag`) into `out_dir`; returns it.

    `tokenizer` overrides the run's data.tokenizer; `allow_missing_tokenizer` converts without one
    when it cannot be found. An existing `out_dir` is replaced only with `overwrite`.
    """
    _started[0] = time.perf_counter()
    dtype = dtype_name(dtype)
    ref = resolve_checkpoint(src, tag)
    meta = ref.meta()
    cfg = single_process_config(meta["config"], source=str(ref.path))
    out_dir = Path(out_dir)
    source = ref.path.resolve()
    if out_dir.resolve() == source or out_dir.resolve() in source.parents:
        raise ConversionError(f"{out_dir} holds the checkpoint being converted ({ref.path}): write the "
                              "converted model somewhere else (--overwrite would delete the training run)")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} already exists: choose another output or pass --overwrite")
    write_tokenizer = _tokenizer_writer(tokenizer or cfg.data.tokenizer, allow_missing_tokenizer)
    verify_manifest(ref)  # every file against its checksum, before anything is written
    check_shards(ref)
    progress(f"converting {ref.path} (stage {cfg.training.stage}, step {meta.get('step')}) to {out_dir} as {dtype}")

    # An existing out_dir (only with overwrite, refused above otherwise) is retired only once the
    # new directory is complete and verified.
    with atomic_directory(out_dir, replace=overwrite) as tmp:
        ae_path = write_weights(ref, cfg, tmp, DTYPES[dtype], embed_autoencoder)
        if write_tokenizer is not None:
            write_tokenizer(tmp / TOKENIZER_NAME)
        source = {"checkpoint": str(ref.path.resolve()), "tag": ref.tag, "step": meta.get("step"),
                  "code_version": meta.get("code_version")}
        config = build_hf_config(cfg, meta["config"], dtype, source, ae_path)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if verify:
            progress("verifying: converted model against the checkpoint on a probe batch")
            report = verify_conversion(ref, tmp, DTYPES[dtype])
            progress("verified: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    progress(f"wrote {out_dir}")
    return out_dir


def write_weights(ref: CheckpointRef, cfg: JobConfig, out: Path, dtype: torch.dtype, embed_autoencoder: bool) -> str | None:
    """model.safetensors (and, for a referenced autoencoder, autoencoder/); returns ae_path."""
    refer = cfg.training.stage == "calm" and not embed_autoencoder
    weights, autoencoder = {}, {}
    for count, (name, tensor) in enumerate(consolidated_weights(ref), start=1):
        check_finite(name, tensor, ref)
        if refer and name.startswith(AE_PREFIX):
            autoencoder[name[len(AE_PREFIX):]] = tensor
        else:  # floating tensors to the chosen dtype, one at a time: one copy of the model
            weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if count % 100 == 0:
            progress(f"gathered {count} tensors")
    progress(f"gathered {len(weights) + len(autoencoder)} tensors; writing {WEIGHTS_NAME}")
    save_file(weights, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if not refer:
        return None
    if not autoencoder:
        raise ConversionError(f"{ref.path} holds no {AE_PREFIX}* tensors to write as a referenced autoencoder")
    save_autoencoder(autoencoder, cfg.autoencoder, out / AUTOENCODER_DIR)
    progress(f"wrote the referenced autoencoder to {AUTOENCODER_DIR}/ (float32, as stage 1 writes it)")
    return AUTOENCODER_DIR


def _tokenizer_writer(spec: str | Path, allow_missing: bool) -> Callable[[Path], None] | None:
    """How to put the run's tokenizer into the output: a tokenizer.json file is copied byte for
    byte; 'gpt2' or a vocab/merges directory is loaded and saved as tokenizer.json."""
    path = Path(spec)
    if path.is_dir() and (path / TOKENIZER_NAME).is_file():
        path = path / TOKENIZER_NAME
    if path.is_file():
        return lambda target: shutil.copyfile(path, target)
    if str(spec) == "gpt2" or path.is_dir():
        try:
            loaded = load_tokenizer(spec)
        except (OSError, ValueError) as exc:
            if not allow_missing:
                raise ConversionError(f"the run's tokenizer {spec} cannot be loaded ({exc})") from None
        else:
            return lambda target: loaded.save(target)
    if allow_missing:
        progress(f"no tokenizer at {spec}: converting without {TOKENIZER_NAME}")
        return None
    raise ConversionError(f"the run's tokenizer file {spec} (data.tokenizer) is missing: pass --tokenizer PATH, "
                          "or --allow-missing-tokenizer to convert without one (relative paths are read "
                          "from the current directory)")
