"""The input side of conversion: find one complete ZeRO checkpoint, check its files, read its
metadata and configuration, and consolidate its weights on CPU.

Nothing here writes to the checkpoint directory (unlike a training CheckpointManager on rank 0,
which removes leftovers of interrupted saves): converting next to a live run is safe.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from calm_dist.config import config_from_dict, validate
from calm_dist.config.schema import JobConfig
from calm_dist.checkpoint.integrity import CheckpointDamaged, verify_checkpoint
from calm_dist.checkpoint.manager import LATEST, META, consolidate_fp32
from calm_dist.checkpoint.saved_layout import layout_of
from calm_dist.parallel.sharding import merge_state_dicts

_TAG = re.compile(r"^global_step(\d+)$")


class ConversionError(ValueError):
    """Bad input to the converter: a wrong path, a missing tag or file, a damaged checkpoint."""


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: `checkpoints_dir / tag`, inside the training run `run_dir`."""

    run_dir: Path
    checkpoints_dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.checkpoints_dir / self.tag

    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())


def complete_tags(checkpoints_dir: Path) -> list[str]:
    """`global_stepN` directories holding meta.json (written last, so complete), oldest first."""
    found = [(int(m.group(1)), e.name) for e in checkpoints_dir.iterdir()
             if (m := _TAG.match(e.name)) and (e / META).is_file()]
    return [name for _, name in sorted(found)]


def _available(checkpoints_dir: Path) -> str:
    return ", ".join(complete_tags(checkpoints_dir)) or "none"


def resolve_checkpoint(src: str | Path, tag: str | None = None) -> CheckpointRef:
    """A training run directory, its `checkpoints/` directory or one `global_stepN` directory,
    resolved to one complete checkpoint: `tag` when given, else the one `latest` names."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} does not exist or is not a directory")
    if _TAG.match(src.name) and src.parent.is_dir():
        if not (src / META).is_file():
            raise ConversionError(f"{src} is not a complete checkpoint (no {META}: an interrupted or "
                                  f"unfinished save); complete ones: {_available(src.parent)}")
        if tag not in (None, src.name):
            raise ConversionError(f"--tag {tag} contradicts the checkpoint directory given, {src}")
        return CheckpointRef(src.parent.parent, src.parent, src.name)
    if (src / "checkpoints").is_dir():
        run_dir, ckpt_dir = src, src / "checkpoints"
    elif (src / LATEST).is_file() or any(_TAG.match(e.name) for e in src.iterdir()):
        run_dir, ckpt_dir = src.parent, src
    else:
        raise ConversionError(f"{src} is not a checkpoint: expected a training run directory (with "
                              "checkpoints/), a checkpoints directory (with latest and global_stepN/) "
                              "or one global_stepN directory")
    if tag is None:
        latest = ckpt_dir / LATEST
        if not latest.is_file():
            raise ConversionError(f"{ckpt_dir} has no '{LATEST}' file; pick a tag with --tag, "
                                  f"available: {_available(ckpt_dir)}")
        tag = latest.read_text().strip()
        if tag not in complete_tags(ckpt_dir):
            raise ConversionError(f"'{LATEST}' in {ckpt_dir} names {tag!r}, which is not a complete "
                                  f"checkpoint; available: {_available(ckpt_dir)}")
    elif tag not in complete_tags(ckpt_dir):
        raise ConversionError(f"no complete checkpoint {tag!r} in {ckpt_dir}; available: {_available(ckpt_dir)}")
    return CheckpointRef(run_dir, ckpt_dir, tag)


def _check_zip(path: Path) -> None:
    """torch.save writes a zip archive; truncation loses its central directory."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConversionError(f"shard {path} is truncated or corrupt ({exc})") from None


def verify_manifest(ref: CheckpointRef, full: bool = True) -> bool:
    """The checkpoint's files against its manifest (sizes, and sha256 when `full`); ConversionError
    naming the damaged file. False when the checkpoint predates manifests (nothing to check)."""
    try:
        return verify_checkpoint(ref.path, full=full)
    except CheckpointDamaged as err:
        raise ConversionError(f"{err}; convert an earlier checkpoint (--tag), available: "
                              f"{_available(ref.checkpoints_dir)}") from None


def check_finite(name: str, tensor: torch.Tensor, ref: CheckpointRef) -> None:
    """A weight holding NaN or inf makes a useless model: refuse, naming the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConversionError(f"{ref.path}: weight {name} holds {bad} non-finite values (NaN or inf): the run had "
                              f"diverged by this step; convert an earlier checkpoint (--tag), available: "
                              f"{_available(ref.checkpoints_dir)}")


def is_model_parallel(ref: CheckpointRef) -> bool:
    """Written by the 3d regime (megatron TP/PP shards) rather than by DeepSpeed ZeRO."""
    return layout_of(ref.meta())["regime"] == "3d"


def _model_parallel_files(ref: CheckpointRef) -> dict[tuple[int, int], Path]:
    layout = layout_of(ref.meta())
    tp, pp = layout["tensor_parallel"], layout["pipeline_parallel"]
    files = {(t, p): ref.path / f"mp_rank_{t:02d}_{p:03d}_model_states.pt" for t in range(tp) for p in range(pp)}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise ConversionError(f"{ref.path} was written with TP={tp}, PP={pp} but lacks {missing}: "
                              "shards are missing or come from another run")
    return files


def check_shards(ref: CheckpointRef) -> None:
    """Every rank's shard is present and whole, before anything unpickles one (DeepSpeed's own
    errors name neither the file nor the cause)."""
    verify_manifest(ref, full=False)  # sizes: cheap; convert and verify also check the checksums
    meta = ref.meta()
    layout = layout_of(meta)
    if is_model_parallel(ref):
        for path in _model_parallel_files(ref).values():
            _check_zip(path)
        return
    tp, pp = layout["tensor_parallel"], layout["pipeline_parallel"]
    if tp * pp != 1:
        raise ConversionError(f"{ref.path} says TP={tp}, PP={pp} without the 3d regime: not a checkpoint "
                              "this version wrote")
    stage, ranks = layout["zero_stage"], meta.get("world_size")
    if stage < 1:
        raise ConversionError(f"{ref.path} was written without ZeRO (zero_stage 0): DeepSpeed's consolidation "
                              "reads ZeRO stages 1-3 only")
    # One optimizer shard per rank; model states per rank under ZeRO-3, one file below it.
    for kind, expected in (("model", ranks if stage == 3 else 1), ("optim", ranks)):
        files = sorted(ref.path.glob(f"*_{kind}_states.pt"))
        if not files:
            raise ConversionError(f"{ref.path} holds no DeepSpeed *_{kind}_states.pt files: not a ZeRO checkpoint")
        if expected is not None and len(files) != expected:
            raise ConversionError(f"{ref.path} was written by {ranks} ranks but holds {len(files)} "
                                  f"*_{kind}_states.pt files: shards are missing or come from another run")
        for path in files:
            _check_zip(path)


def merged_model_parallel_weights(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The single-process state dict of a 3d checkpoint: its (tensor, pipeline) shards merged."""
    check_shards(ref)
    shards = {}
    for (tp, pp), path in _model_parallel_files(ref).items():
        chunks = torch.load(path, map_location="cpu", weights_only=True)  # {"chunk0": state dict, ...}
        for vp in range(len(chunks)):
            shards[(tp, pp, vp)] = chunks[f"chunk{vp}"]
    try:
        return merge_state_dicts(shards, num_layers=ref.meta()["config"]["model"]["num_layers"])
    except ValueError as err:
        raise ConversionError(f"{ref.path}: {err}") from None


def single_process_config(saved: dict, source: str) -> JobConfig:
    """The run's configuration, validated for one process (as evaluation and generation run).

    The saved batch arithmetic and layout belong to the training world: the accumulation steps
    are re-derived from the global batch for one rank, a 3d run's TP/PP layout becomes one process
    (the merged weights are a single-process model's), and the derived section is recomputed.
    """
    data = json.loads(json.dumps(saved))  # a deep copy of plain data
    data.pop("derived", None)
    data.setdefault("training", {})["gradient_accumulation_steps"] = 0
    data["training"]["init_weights"] = ""
    data.setdefault("parallel", {}).update(regime="zero3", tensor_parallel=1, pipeline_parallel=1, zero_stage=3,
                                           sequence_parallel=False, ds_preset="")
    return validate(config_from_dict(data, source=source), world_size=1)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """DeepSpeed prints progress to stdout; ours (and a CLI's results) keep stdout clean."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def lazy_state_dict(ref: CheckpointRef) -> dict:
    """DeepSpeed's lazy consolidation: name -> an object whose `.contiguous()` is the full fp32
    tensor. The optimizer shards are memory-mapped and each parameter is gathered on demand.
    (A 3d checkpoint's merged tensors are returned as they are: they have `.contiguous()` too.)"""
    if is_model_parallel(ref):
        return merged_model_parallel_weights(ref)
    check_shards(ref)
    with stdout_to_stderr():  # DeepSpeed logs to stdout from its first import on
        return consolidate_fp32(ref.checkpoints_dir, ref.tag, lazy=True)


def consolidated_weights(ref: CheckpointRef) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) pairs, one materialised at a time: the caller decides how many
    exist at once (3d checkpoints: merged up front, their shards are whole tensors)."""
    if is_model_parallel(ref):
        yield from merged_model_parallel_weights(ref).items()
        return
    seen: set[int] = set()
    for name, lazy in lazy_state_dict(ref).items():
        tensor = lazy.contiguous()
        if id(lazy) in seen:  # a tied parameter under two names: safetensors wants two tensors
            tensor = tensor.clone()
        seen.add(id(lazy))
        yield name, tensor
