"""Where each point stands: planned, submitted, running, finished or failed, and its step.

Sources, in order: the trainer's `checkpoints/latest` (step >= train_steps: finished, whatever
else is recorded); the point's `job.json`, written when the point was submitted (local: the
trainer's pid and host, then its exit code; SLURM: the array task id, looked up with `squeue`).
Without `squeue` (or on another host for a local run) a live job cannot be told from a dead one,
and the point stays `submitted`.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

from calm_dist.common.atomic import atomic_write_json
from calm_dist.common.processes import pid_alive

JOB_FILE = "job.json"
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT"}
_SLURM_WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"}


def checkpoint_step(point_dir: Path) -> int:
    latest = Path(point_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    m = re.fullmatch(r"global_step(\d+)", latest.read_text().strip())
    return int(m.group(1)) if m else 0


def metrics_step(point_dir: Path) -> int:
    """The last step logged to metrics.jsonl (ahead of the checkpoint while a run is going)."""
    f = Path(point_dir) / "metrics.jsonl"
    step = 0
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step") or 0))
            except (ValueError, AttributeError):
                continue
    return step


def read_job(point_dir: Path) -> Optional[dict[str, Any]]:
    f = Path(point_dir) / JOB_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def write_job(point_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(Path(point_dir) / JOB_FILE, record, indent=2)


def squeue_states(job_ids: list[str]) -> Optional[dict[str, str]]:
    """{array task id "123_4": SLURM state} for the given array job ids; None when squeue is
    unavailable or fails (state unknown). A job id SLURM no longer knows simply has no entries."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    states: dict[str, str] = {}
    for job in sorted(set(job_ids)):
        try:
            proc = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i|%T"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            if "invalid job id" in proc.stderr.lower():
                continue  # finished long enough ago that the controller forgot it
            return None
        for line in proc.stdout.splitlines():
            task, _, state = line.strip().partition("|")
            states[task] = state
    return states


def point_state(point: dict[str, Any], point_dir: Path, slurm: Optional[dict[str, str]]) -> tuple[str, int]:
    """(state, step) of one point; `slurm` from squeue_states (None: unknown)."""
    step = max(checkpoint_step(point_dir), metrics_step(point_dir))
    if checkpoint_step(point_dir) >= point["train_steps"]:
        return "finished", checkpoint_step(point_dir)
    job = read_job(point_dir)
    if job is None:
        return ("failed" if step else "planned"), step
    if job.get("exit_code") is not None:
        return "failed", step  # exited without reaching train_steps
    if job["mode"] == "local":
        if job.get("host") != socket.gethostname():
            return "submitted", step  # cannot look at another host's processes
        return ("running" if job.get("pid") and pid_alive(job["pid"]) else "failed"), step
    if slurm is None:
        return "submitted", step
    state = slurm.get(job["job_id"])
    if state in _SLURM_RUNNING:
        return "running", step
    if state in _SLURM_WAITING:
        return "submitted", step
    return "failed", step  # gone from the queue (or ended) without finishing


def sweep_states(sweep_dir: Path, points: list[dict[str, Any]]) -> list[tuple[str, int, Optional[dict]]]:
    """(state, step, job record) per point, with one squeue call per array job."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(sweep_dir / p["name"]) for p in points]
    array_ids = [j["job_id"].split("_")[0] for j in jobs if j and j.get("mode") == "slurm"]
    slurm = squeue_states(array_ids)
    return [(*point_state(p, sweep_dir / p["name"], slurm), j) for p, j in zip(points, jobs)]
