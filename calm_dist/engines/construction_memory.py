"""Whether every rank of a node can build the whole model before DeepSpeed partitions it.

Built whole (parallel.zero_init=false, or ZeRO stage 1/2), each rank materialises every fp32
weight first: a node needs (its ranks) x (model bytes) of host memory at start-up, however many
nodes share the training. A model that cannot fit that way is refused before anything is built,
with the fix named, instead of being killed by the kernel minutes later.
"""

from __future__ import annotations

from calm_dist.config.schema import JobConfig
from calm_dist.models.param_counts import autoencoder_param_count, baseline_param_count, calm_param_count

FP32_BYTES = 4


def built_param_count(cfg: JobConfig) -> int:
    """Every parameter the stage's model holds at construction (CALM's frozen autoencoder too)."""
    stage = cfg.training.stage
    if stage == "autoencoder":
        return autoencoder_param_count(cfg.autoencoder)
    if stage == "calm":
        return calm_param_count(cfg.model) + autoencoder_param_count(cfg.autoencoder)
    return baseline_param_count(cfg.model)


def whole_model_refusal(param_count: int, local_ranks: int, available_bytes: int) -> str | None:
    """Why `local_ranks` whole fp32 copies of a `param_count` model cannot be built with
    `available_bytes` of host memory, or None when they can."""
    needed = param_count * FP32_BYTES * local_ranks
    if needed <= available_bytes:
        return None
    gib = 1 << 30
    return (f"building the whole model on each of this node's {local_ranks} rank(s) needs "
            f"{needed / gib:.1f} GiB of host memory ({param_count:,} fp32 parameters each) and "
            f"{available_bytes / gib:.1f} GiB is available: build it partitioned (parallel.zero_stage=3 "
            "with parallel.zero_init=true), or run fewer ranks per node")
