"""`calm-convert inspect` and `calm-convert diff`: what a checkpoint or converted directory holds,
and how two of them differ.

A converted directory is read from safetensors headers (names, shapes, dtypes) without loading its
weights; a training checkpoint through DeepSpeed's lazy consolidation. Tensor values are loaded
one at a time, and only by `diff`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from calm_dist.checkpoint.hf_config import (
    AE_PREFIX,
    CONFIG_NAME,
    STAGES,
    WEIGHTS_NAME,
    build_hf_config,
    read_hf_config,
)
from calm_dist.checkpoint.reading import ConversionError, lazy_state_dict, resolve_checkpoint, single_process_config
from calm_dist.checkpoint.saved_layout import layout_of
from calm_dist.config import flatten_config
from calm_dist.models.kinds import model_kind
from calm_dist.weights_file import open_safetensors

_NOT_SUMMARY = ("calm_dist", "source", "autoencoder_config")
# safetensors' dtype names, so that a checkpoint and a converted directory list alike
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                torch.int32: "I32", torch.bool: "BOOL"}


@dataclass
class _Opened:
    """A checkpoint or converted directory, read lazily."""

    path: Path
    form: str  # "checkpoint" | "converted"
    stage: str
    step: int | None
    tag: str | None
    config: dict  # the run's job configuration, as saved
    summary: dict  # architecture fields under the reference's names
    shapes: dict[str, tuple[list[int], str]]  # name -> (shape, dtype)
    tensor: Callable[[str], torch.Tensor]  # name -> the full tensor
    extra: dict = field(default_factory=dict)


def _open(path: str | Path, tag: str | None = None) -> _Opened:
    path = Path(path)
    if (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file():
        for name in (CONFIG_NAME, WEIGHTS_NAME):  # a converted directory: both or it is damaged
            if not (path / name).is_file():
                raise ConversionError(f"{path} looks like a converted directory but {path / name} is missing: "
                                      "convert the checkpoint again")
        return _open_converted(path)
    return _open_checkpoint(path, tag)


def _open_checkpoint(path: Path, tag: str | None) -> _Opened:
    ref = resolve_checkpoint(path, tag)
    meta = ref.meta()
    cfg = single_process_config(meta["config"], source=str(ref.path))
    lazy = lazy_state_dict(ref)
    shapes = {name: (list(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype))) for name, t in lazy.items()}
    summary = {k: v for k, v in build_hf_config(cfg, {}, "float32", {}, None).items() if k not in _NOT_SUMMARY}
    extra = {"layout": layout_of(meta), "train_state": meta.get("train_state"), "code_version": meta.get("code_version")}
    return _Opened(ref.path, "checkpoint", cfg.training.stage, meta.get("step"), ref.tag, meta["config"], summary,
                   shapes, lambda name: lazy[name].contiguous().float(), extra)


def _open_converted(path: Path) -> _Opened:
    config = read_hf_config(path)
    files = {"": path / WEIGHTS_NAME}
    if config.get("ae_path"):  # a referenced autoencoder: listed as the embedded one would be
        files[AE_PREFIX] = path / config["ae_path"] / WEIGHTS_NAME
    shapes, where = {}, {}
    for prefix, file in files.items():
        with open_safetensors(file) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shapes[prefix + name] = (list(piece.get_shape()), piece.get_dtype())
                where[prefix + name] = (file, name)

    def tensor(name: str) -> torch.Tensor:
        file, key = where[name]
        with open_safetensors(file) as f:
            return f.get_tensor(key).float()

    source = config.get("source", {})
    summary = {k: v for k, v in config.items() if k not in _NOT_SUMMARY}
    return _Opened(path, "converted", STAGES[config["model_type"]], source.get("step"), source.get("tag"),
                   config["calm_dist"], summary, shapes, tensor, {"source": source})


def _parameter_counts(opened: _Opened) -> dict:
    by_module: dict[str, int] = {}
    for name, (shape, _) in opened.shapes.items():
        top = name.split(".")[0]
        by_module[top] = by_module.get(top, 0) + int(torch.Size(shape).numel())
    total = sum(by_module.values())
    # What the kind keeps frozen (CALM's autoencoder in stage 2); everything else trains.
    frozen = sum(by_module.get(module, 0) for module in model_kind(opened.stage).frozen_modules)
    return {"total": total, "trainable": total - frozen, "frozen": frozen, "by_module": by_module}


def inspect_checkpoint(path: str | Path, tag: str | None = None) -> dict:
    """Step, stage, configuration summary, parameter counts and every tensor's shape and dtype."""
    opened = _open(path, tag)
    return {
        "path": str(opened.path), "format": opened.form, "stage": opened.stage, "tag": opened.tag,
        "step": opened.step, "config": opened.summary, "parameters": _parameter_counts(opened),
        "tensors": {name: {"shape": shape, "dtype": dtype} for name, (shape, dtype) in opened.shapes.items()},
        **opened.extra,
    }


def diff_checkpoints(a: str | Path, b: str | Path) -> dict:
    """Configuration fields that differ (dotted names), tensors only in one side, shape mismatches,
    and the max absolute difference of every common tensor (computed in float32)."""
    left, right = _open(a), _open(b)
    flat_a, flat_b = flatten_config(left.config), flatten_config(right.config)
    config = {key: [flat_a.get(key), flat_b.get(key)] for key in sorted(flat_a.keys() | flat_b.keys())
              if flat_a.get(key) != flat_b.get(key)}
    common = [name for name in left.shapes if name in right.shapes]
    mismatched = {name: [left.shapes[name][0], right.shapes[name][0]] for name in common
                  if left.shapes[name][0] != right.shapes[name][0]}
    max_abs = {}
    for name in common:
        if name not in mismatched:  # one pair of tensors in memory at a time
            tensor_a, tensor_b = left.tensor(name), right.tensor(name)
            max_abs[name] = (tensor_a - tensor_b).abs().max().item() if tensor_a.numel() else 0.0
    differing = sorted((n for n, d in max_abs.items() if d != 0.0), key=lambda n: -max_abs[n])
    only_a = sorted(left.shapes.keys() - right.shapes.keys())
    only_b = sorted(right.shapes.keys() - left.shapes.keys())
    return {
        "a": {"path": str(left.path), "format": left.form, "step": left.step},
        "b": {"path": str(right.path), "format": right.form, "step": right.step},
        "config": config, "only_in_a": only_a, "only_in_b": only_b, "shape_mismatch": mismatched,
        "max_abs_diff": max_abs, "differing_tensors": differing,
        "identical": not (config or only_a or only_b or mismatched or differing),
    }


# ---- printing ---------------------------------------------------------------------------------


def format_inspection(info: dict, max_tensors: int = 200) -> str:
    params = info["parameters"]
    where = f"{info['tag']}, step {info['step']}" if info["format"] == "checkpoint" else \
        f"{info['config'].get('torch_dtype')}, from {info.get('source', {}).get('tag')} step {info['step']}"
    lines = [f"path:       {info['path']}", f"format:     {info['format']} ({where})",
             f"stage:      {info['stage']} (model_type {info['config'].get('model_type')})",
             "config:     " + " ".join(f"{k}={v}" for k, v in info["config"].items()
                                       if k not in ("model_type", "architectures", "torch_dtype")),
             f"parameters: total {params['total']:,}  trainable {params['trainable']:,}  frozen {params['frozen']:,}"]
    lines += [f"  {name:<24} {count:>14,}" for name, count in params["by_module"].items()]
    tensors = list(info["tensors"].items())
    lines.append(f"tensors ({len(tensors)}):")
    width = max((len(n) for n, _ in tensors[:max_tensors]), default=0)
    lines += [f"  {name:<{width}}  {str(t['shape']):<20} {t['dtype']}" for name, t in tensors[:max_tensors]]
    if len(tensors) > max_tensors:
        lines.append(f"  ... {len(tensors) - max_tensors} more (--max-tensors)")
    return "\n".join(lines)


def format_diff(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"a: {a['path']} ({a['format']}, step {a['step']})", f"b: {b['path']} ({b['format']}, step {b['step']})"]
    lines.append(f"config: {len(result['config'])} field(s) differ")
    lines += [f"  {key}: {json.dumps(va)} -> {json.dumps(vb)}" for key, (va, vb) in result["config"].items()]
    for key, label in (("only_in_a", "only in a"), ("only_in_b", "only in b")):
        if result[key]:
            lines.append(f"tensors {label} ({len(result[key])}): " + ", ".join(result[key]))
    lines += [f"shape mismatch: {name}: {sa} vs {sb}" for name, (sa, sb) in result["shape_mismatch"].items()]
    common = len(result["max_abs_diff"])
    lines.append(f"tensors: {len(result['differing_tensors'])} of {common} common tensor(s) differ")
    lines += [f"  {name:<48} max|a-b| {result['max_abs_diff'][name]:.4g}" for name in result["differing_tensors"]]
    lines.append("identical" if result["identical"] else "different")
    return "\n".join(lines)
