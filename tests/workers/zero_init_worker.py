"""Worker for tests/test_zero_init.py: a model built partitioned (ZeRO-3's zero.Init, as the zero3
engine builds it) against the same model built whole on the same seed, on 2 ranks over gloo.

For each model kind, each rank builds the engine partitioned and checks that it holds only its
shard of every parameter (no whole model was ever needed); rank 0 then gathers the parameters one
at a time and compares them bit for bit with an unpartitioned build. `--init-weights` does the same
for training.init_weights (a safetensors file written by the test). Rank 0 writes
`<out>/result.json`: per kind, the parameters that differ and how many were compared, and whether
torch.nn.functional.linear is still torch's after the engine was built.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from calm_dist.config import load_config, validate
from calm_dist.engines.deepspeed_zero import build_zero_engine
from calm_dist.engines.initial_weights import load_initial_weights
from calm_dist.engines.model_build import build_model
from calm_dist.parallel.launch import init_distributed, shutdown_distributed
from calm_dist.parallel.state import current_layout, ensure_model_parallel, seed_model_building


def compare(cfg, layout, device) -> dict:
    seed_model_building(cfg.training.seed, layout)
    linear = torch.nn.functional.linear
    engine = build_zero_engine(cfg, layout, device)
    linear_kept = torch.nn.functional.linear is linear  # DeepSpeed did not replace it process-wide
    seed_model_building(cfg.training.seed, layout)
    whole = build_model(cfg)
    if cfg.training.init_weights:
        load_initial_weights(whole, cfg.training.init_weights)
    reference = dict(whole.named_parameters())
    differ, not_sharded, compared = [], [], 0
    for name, param in engine.module.named_parameters():
        if param.ds_numel >= dist.get_world_size() and param.ds_tensor.numel() >= param.ds_numel:
            not_sharded.append(name)
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.data, reference[name].data):
                differ.append(name)
            compared += 1
    return {"differ": differ, "not_sharded": not_sharded, "compared": compared, "expected": len(reference),
            "linear_kept": linear_kept}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", action="append", required=True, help='"preset override ..." (one string)')
    args = parser.parse_args()
    info = init_distributed("cpu")
    ensure_model_parallel()
    layout = current_layout()
    results = {}
    for case in args.case:
        preset, *overrides = case.split()
        cfg = validate(load_config([preset], overrides), world_size=info.world_size)
        assert cfg.parallel.zero_init and cfg.parallel.zero_stage == 3
        results[case] = compare(cfg, layout, torch.device("cpu"))
    # DeepSpeed's CPU accelerator counts the ranks on this node from LOCAL_SIZE (init_distributed),
    # instead of running numactl at every gradient bucket.
    from deepspeed.accelerator import get_accelerator

    results["device_count"] = get_accelerator().device_count()
    if info.rank == 0:
        (args.out / "result.json").write_text(json.dumps(results, indent=1))
    shutdown_distributed(clean=True)


if __name__ == "__main__":
    main()
