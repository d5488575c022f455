"""ZeRO-3 scaling on CPU: per-rank parameter and optimizer memory, and step time, at 1, 2 and 4 ranks.

Each world size is one torchrun launch of bench/workers/zero3_worker.py (gloo, OMP_NUM_THREADS=1,
a real DeepSpeed ZeRO-3 engine around the tiny CALM, built as the trainer builds it). Per-rank
state = parameter partitions (+ the small parameters ZeRO-3 keeps whole: stage3_param_persistence_
threshold) + fp32 master partitions + Adam moments. Target: within 10% of 1/world of the state at
world 1. Step time is weak scaling (same micro batch per rank); with more ranks than cores the
ranks share cores, so the overhead is also given against the ideal max(1, world / cores) x t1.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import launch_worker
from bench.report import BenchResult, at_most

NAME = "zero3"
WORKER = Path(__file__).resolve().parent / "workers" / "zero3_worker.py"


def launch(world: int, out: Path, steps: int, timeout: float = 300.0) -> list[dict]:
    """One torchrun launch; returns the per-rank records."""
    launch_worker(WORKER, world, out, ["--steps", str(steps)], timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def launch_with_retry(world: int, out: Path, steps: int) -> tuple[list[dict], str]:
    """One retry: on a loaded 2-core machine a launch can fail at start-up (rendezvous port taken,
    gloo connect timeout); the failure of the first try is kept and reported."""
    try:
        return launch(world, out, steps), ""
    except RuntimeError as err:
        return launch(world, out.with_name(out.name + "-retry"), steps), str(err)[:300]


def state_bytes(record: dict) -> int:
    return (record["param_partition_bytes"] + record["persistent_param_bytes"] + record["optimizer_master_bytes"]
            + record["optimizer_moment_bytes"])


def run(quick: bool = False, worlds: tuple[int, ...] = (1, 2, 4)) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    cores = os.cpu_count() or 1
    records = {}
    with tempfile.TemporaryDirectory(prefix="calm-bench-zero3-") as tmp:
        retried = {}
        for world in worlds:
            records[world], failure = launch_with_retry(world, Path(tmp) / f"w{world}", steps=2 if quick else 4)
            if failure:
                retried[world] = failure
    base = records[worlds[0]]
    total = state_bytes(base[0]) * worlds[0]
    t1 = min(min(r["step_seconds"]) for r in base)
    details = {"cores": cores, "state_bytes_world1": total, "worlds": {}, "retried": retried}
    for world, recs in records.items():
        per_rank = max(state_bytes(r) for r in recs)
        ideal = total / world
        excess = per_rank / ideal - 1
        step = max(min(r["step_seconds"]) for r in recs)  # the slowest rank's best step
        shared = max(1.0, world / cores)
        details["worlds"][world] = {"per_rank_state_bytes": per_rank, "ideal_bytes": ideal, "excess": excess,
                                    "step_seconds": step, "records": recs}
        parts = recs[0]
        retry_note = f" (second launch; the first failed: {retried[world][:120]})" if world in retried else ""
        mib = 2**20
        result.add(f"world {world}: per-rank state / (total / world)", 1 + excess, "x", "<= 1.10x",
                   at_most(excess, 0.10),
                   f"{per_rank / mib:.1f} MiB per rank vs {ideal / mib:.1f} ideal (params "
                   f"{(parts['param_partition_bytes'] + parts['persistent_param_bytes']) / mib:.1f}, fp32 master "
                   f"{parts['optimizer_master_bytes'] / mib:.1f}, Adam moments {parts['optimizer_moment_bytes'] / mib:.1f} MiB)"
                   f"{retry_note}")
        if world != worlds[0]:
            result.add(f"world {world}: step time / world-1 step time", step / t1, "x", "", None,
                       f"{1e3 * step:.0f} ms vs {1e3 * t1:.0f} ms (same micro batch per rank); against the ideal "
                       f"{shared:.0f} x t1 for {world} ranks on {cores} cores: {step / (t1 * shared):.2f}x")
    result.details = details
    result.seconds = time.perf_counter() - start
    return result
