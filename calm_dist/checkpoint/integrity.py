"""What makes a checkpoint trustworthy: a manifest of every file's size and checksum, checked
before anything is loaded, and finite weights and optimizer states before anything is saved.

`manifest.json` in `global_stepN/` lists every other file of the checkpoint (DeepSpeed's, the 3d
engine's, the rank files and meta.json) with its size and sha256 (about 1.7 GB/s per core with the
CPU's SHA instructions; each rank hashes a share of the files, so a save or a verification costs
one read of the checkpoint spread over the ranks). A checkpoint without a manifest was written by
calm-dist before it existed: it loads, unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from calm_dist.common.atomic import TEMP_MARK

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
META = "meta.json"  # the checkpoint's metadata; says whether a manifest was written beside it
MANIFEST_FORMAT = "calm-dist-checkpoint-manifest"
MANIFEST_VERSION = 1
_READ_BYTES = 8 << 20


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its manifest (or cannot be read); names the file."""


class NonFiniteState(RuntimeError):
    """Weights or optimizer states hold NaN or inf: such a state is never saved."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def from_rank0(value):
    """Rank 0's value on every rank: every rank then works from one view of a shared directory."""
    if not _distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _gather(local: dict) -> dict:
    """The union of every rank's dict, on every rank."""
    if not _distributed():
        return dict(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def _share(names: list[str]) -> list[str]:
    """This rank's share of the files to hash (all ranks hold the same sorted list)."""
    if not _distributed():
        return names
    return names[dist.get_rank():: dist.get_world_size()]


def checkpoint_files(directory: Path) -> list[str]:
    """The files a manifest covers: every regular file below the checkpoint, except the manifest."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST and TEMP_MARK not in path.name  # not a write in progress
    )


def write_manifest(directory: Path, write_file) -> dict:
    """Hash every file of `directory` (a collective: rank 0 lists the files, each rank hashes its
    share) and, on rank 0, write the manifest with `write_file(path, bytes)` (an atomic writer).
    Returns the entries."""
    names = from_rank0(checkpoint_files(directory) if _is_rank0() else None)
    local = {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in _share(names)}
    entries = _gather(local)
    if _is_rank0():
        if sorted(entries) != names:
            raise RuntimeError(f"{directory}: hashed {len(entries)} of its {len(names)} files")
        body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": entries}
        write_file(directory / MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())
    return entries


def read_manifest(directory: Path) -> dict | None:
    """The manifest's file entries; None when the checkpoint has none (an older calm-dist)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    if body.get("format") != MANIFEST_FORMAT or not isinstance(body.get("files"), dict):
        raise CheckpointDamaged(f"{path} is not a calm-dist checkpoint manifest")
    return body["files"]


def checkpoint_bytes(directory: Path) -> int | None:
    """The checkpoint's size from its manifest (None without one)."""
    try:
        entries = read_manifest(directory)
    except CheckpointDamaged:
        return None
    return None if entries is None else sum(int(e["bytes"]) for e in entries.values())


def _manifest_or_problem(directory: Path) -> tuple[dict | None, str | None]:
    try:
        entries = read_manifest(directory)
        if entries is None and json.loads((directory / META).read_text()).get("manifest"):
            return None, f"{directory / MANIFEST} is missing (its {META} says one was written)"
    except CheckpointDamaged as err:
        return None, str(err)
    except (OSError, ValueError) as err:
        return None, f"{directory / META} is unreadable ({type(err).__name__}: {err})"
    return entries, None


def _file_problem(directory: Path, name: str, entry: dict, full: bool) -> str | None:
    path = directory / name
    try:
        if not path.is_file():
            return f"{path} is missing (the manifest lists it)"
        size = path.stat().st_size
        if size != int(entry["bytes"]):
            return f"{path} has {size} bytes, the manifest says {entry['bytes']}: truncated or replaced"
        if full and file_sha256(path) != entry["sha256"]:
            return f"{path} does not match its checksum in {MANIFEST}: the file is damaged"
    except OSError as err:
        return f"{path} is unreadable ({type(err).__name__}: {err})"
    return None


def verify_checkpoint(directory: Path, full: bool = True) -> bool:
    """Check `directory` against its manifest; a collective when distributed: rank 0 reads the
    manifest, every rank checks a share of the files, and every rank gets the same verdict.
    Raises CheckpointDamaged naming the first bad file; returns False when there is no manifest to
    check against (a checkpoint from before manifests; one whose meta.json says a manifest was
    written but lacks it is damaged), True when it verified. `full=False` checks presence and
    sizes only (no reading)."""
    entries, problem = from_rank0(_manifest_or_problem(directory) if _is_rank0() else None)
    if problem:
        raise CheckpointDamaged(problem)
    if entries is None:
        return False
    local = {}
    for name in _share(sorted(entries)):
        found = _file_problem(directory, name, entries[name], full)
        if found:
            local[name] = found
    problems = _gather(local)
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
        raise CheckpointDamaged(problems[first] + more)
    return True


# ---- finite state -----------------------------------------------------------------------------


def _tensors(value) -> Iterable[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _inner_optimizers(engine) -> list:
    """The torch optimizers that hold the moments (under DeepSpeed's ZeRO wrapper, under ZeRO-1)."""
    found, optimizer = [], getattr(engine, "optimizer", None)
    while optimizer is not None and optimizer not in found:
        found.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "optim", None)
    return found


def local_non_finite(engine) -> dict[str, int]:
    """Non-finite values this rank holds: in its (partition of the) weights, its fp32 master
    weights and its optimizer moments. Keys: 'weights', 'optimizer'."""
    weights = 0
    for param in engine.module.parameters():
        data = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
        if data.is_floating_point():
            weights += int((~torch.isfinite(data)).sum())
    moments = 0
    for optimizer in _inner_optimizers(engine):
        for flat in getattr(optimizer, "fp32_partitioned_groups_flat", None) or []:
            if torch.is_tensor(flat):
                weights += int((~torch.isfinite(flat)).sum())
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            for tensor in _tensors(list(state.values())):
                if tensor.is_floating_point():
                    moments += int((~torch.isfinite(tensor)).sum())
    return {"weights": weights, "optimizer": moments}


def global_non_finite(engine) -> dict[str, int]:
    """`local_non_finite` summed over every rank (a collective), the same on every rank."""
    local = local_non_finite(engine)
    counts = torch.tensor([local["weights"], local["optimizer"]], dtype=torch.int64)
    if _distributed():
        if dist.get_backend() == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts)
    return {"weights": int(counts[0]), "optimizer": int(counts[1])}
