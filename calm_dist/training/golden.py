"""Golden losses: compare a run's per-step training losses with a stored reference.

A change that should not move the numerics (a refactor, a new backend) must reproduce the golden
file of the tiny CPU config; one that should, updates it deliberately (`--update`) and says why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from calm_dist.training.metrics import read_metrics


def run_losses(run_dir: str | Path) -> dict[int, float]:
    """Per-step training loss from a run's metrics.jsonl (the last record of a step wins)."""
    losses = {}
    for record in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if record.get("kind") == "train" and record.get("loss") is not None:
            losses[int(record["step"])] = float(record["loss"])
    return losses


def compare_losses(run_dir: str | Path, golden_file: str | Path, rtol: float = 1e-3) -> list[str]:
    """Differences beyond `rtol` (relative), one line each; empty when the run matches."""
    golden = {int(k): v for k, v in json.loads(Path(golden_file).read_text())["losses"].items()}
    ours = run_losses(run_dir)
    problems = [f"step {step}: missing from the run" for step in golden if step not in ours]
    for step, expected in sorted(golden.items()):
        if step in ours and not math.isclose(ours[step], expected, rel_tol=rtol):
            problems.append(f"step {step}: loss {ours[step]!r} vs golden {expected!r}")
    return problems


def write_golden(run_dir: str | Path, golden_file: str | Path, note: str) -> None:
    payload = {"note": note, "losses": {str(k): v for k, v in sorted(run_losses(run_dir).items())}}
    Path(golden_file).write_text(json.dumps(payload, indent=2) + "\n")
