"""The merged DeepSpeed config of a zero3 run, and the resume check that guards what it changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calm_dist.checkpoint.manager import CheckpointMismatch, check_optimizer_tiling
from calm_dist.config import load_config, validate
from calm_dist.engines.deepspeed_config import CPU_SUB_GROUP_SIZE, build_ds_config, load_preset, preset_path


def _cfg(*overrides: str):
    return validate(load_config(["tiny_baseline"], list(overrides)))


def test_cpu_runs_tile_the_zero3_optimizer_step_and_a_preset_value_is_kept(tmp_path):
    cfg = _cfg()
    cpu, gpu = build_ds_config(cfg, on_cuda=False), build_ds_config(cfg, on_cuda=True)
    assert cpu["zero_optimization"]["sub_group_size"] == CPU_SUB_GROUP_SIZE
    assert CPU_SUB_GROUP_SIZE * 4 <= 32 * 2**20  # fp32 temporaries stay under glibc's largest mmap threshold
    assert "sub_group_size" not in gpu["zero_optimization"]  # DeepSpeed's default on the GPU
    preset = load_preset(preset_path(cfg))
    preset["zero_optimization"]["sub_group_size"] = 123_456
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    assert build_ds_config(_cfg(f"parallel.ds_preset={path}"), on_cuda=False)["zero_optimization"]["sub_group_size"] == 123_456
    assert "sub_group_size" not in build_ds_config(_cfg("parallel.zero_stage=2"), on_cuda=False)["zero_optimization"]


def test_zero3_optimizer_state_in_other_sub_groups_is_refused_naming_both_fixes():
    cfg = _cfg()
    current = build_ds_config(cfg, on_cuda=False)
    older = json.loads(json.dumps(current))
    del older["zero_optimization"]["sub_group_size"]  # a checkpoint written with DeepSpeed's default
    path = Path("run/checkpoints/global_step9")
    with pytest.raises(CheckpointMismatch) as excinfo:
        check_optimizer_tiling(older, current, path)
    message = str(excinfo.value)
    assert str(path) in message and "1,000,000,000" in message and f"{CPU_SUB_GROUP_SIZE:,}" in message
    assert '"sub_group_size": 1000000000' in message and "training.load_optimizer=false" in message
    check_optimizer_tiling(current, json.loads(json.dumps(current)), path)  # the same tiling loads
    check_optimizer_tiling(None, current, path)  # a checkpoint without a DeepSpeed config (3d regime)
    stage2 = build_ds_config(_cfg("parallel.zero_stage=2"), on_cuda=False)
    check_optimizer_tiling(stage2, json.loads(json.dumps(stage2)) | {"zero_optimization": {"stage": 2, "sub_group_size": 5}}, path)
