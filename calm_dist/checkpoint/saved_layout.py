"""The parallel layout a checkpoint was written with, read from its meta.json.

A checkpoint's meta.json holds the run's whole config and its world size; the layout (regime,
TP, PP, virtual stages, DP, ZeRO stage) follows from them, so it is not stored a second time.
Checkpoints written before this version also carry a copy under "layout", which is read as it is.
"""

from __future__ import annotations

from calm_dist.config.schema import ParallelConfig


def layout_of(meta: dict) -> dict:
    """{"world_size", "regime", "tensor_parallel", "pipeline_parallel", "virtual_stages",
    "data_parallel", "zero_stage"} of the checkpoint whose meta.json is `meta`."""
    parallel = {**vars(ParallelConfig()), **meta.get("config", {}).get("parallel", {})}
    world = meta.get("world_size", meta.get("layout", {}).get("world_size", 1))
    tp, pp = parallel["tensor_parallel"], parallel["pipeline_parallel"]
    derived = {"world_size": world, "regime": parallel["regime"], "tensor_parallel": tp, "pipeline_parallel": pp,
               "virtual_stages": parallel["virtual_pipeline_stages"], "data_parallel": world // (tp * pp),
               "zero_stage": parallel["zero_stage"]}
    # Written before the layout was derived: what it stored wins (some versions stored fewer keys).
    return {**derived, **meta.get("layout", {})}
