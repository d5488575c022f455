"""The output directory belongs to calm-dist only once calm-dist has marked it.

A run writes config.yaml, ds_config.json, metrics.jsonl, tensorboard/, checkpoints/ and
autoencoder/ into `training.output_dir`, replacing what is there under those names. So a directory
that already holds files is used only when it is a calm-dist run: it carries the marker
`.calm-dist-run` (written by the first launch, or by calm-sweep when it lays out a point), or it is
a run from before the marker existed (it has checkpoints/ or metrics.jsonl). Anything else is
refused, naming the files, before anything is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from calm_dist import __version__
from calm_dist.common.atomic import atomic_write_bytes

MARKER = ".calm-dist-run"
_EARLIER_RUN_SIGNS = ("checkpoints", "metrics.jsonl")  # a run written before the marker existed
_LOCK_PREFIX = ".run.lock"


def is_run_dir(path: Path) -> bool:
    return (path / MARKER).is_file() or any((path / name).exists() for name in _EARLIER_RUN_SIGNS)


def foreign_entries(path: Path) -> list[str]:
    """What in `path` stops calm-dist from using it as an output directory (empty: usable)."""
    if not path.is_dir() or is_run_dir(path):
        return []
    return sorted(entry.name for entry in path.iterdir() if not entry.name.startswith(_LOCK_PREFIX))


def refusal(path: Path, entries: list[str]) -> str:
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    return (f"{path} is not empty and is not a calm-dist run (it holds {shown}); a run would overwrite files "
            "there. Choose a new or empty training.output_dir")


def mark_run_dir(path: Path) -> None:
    """Make `path` (created if needed) a calm-dist output directory."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        body = {"created_by": "calm-dist", "version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_bytes(path / MARKER, (json.dumps(body) + "\n").encode())
