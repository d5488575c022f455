"""The merged DeepSpeed config of a zero3 run, and the resume check that guards what it changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calm_dist.checkpoint.manager import CheckpointMismatch, check_optimizer_tiling
from calm_dist.config import load_config, validate
from calm_dist.engines.deepspeed_config import (
    CPU_SUB_GROUP_SIZE,
    ONE_RANK_REDUCE_BUCKET,
    build_ds_config,
    load_preset,
    preset_path,
)


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


def test_one_rank_zero3_all_reduces_a_larger_bucket_in_place_and_more_ranks_reduce_scatter(tmp_path):
    one = build_ds_config(validate(load_config(["tiny_baseline"], []), world_size=1), on_cuda=False)["zero_optimization"]
    assert one["reduce_scatter"] is False and one["reduce_bucket_size"] == ONE_RANK_REDUCE_BUCKET
    two = build_ds_config(validate(load_config(["tiny_baseline"], []), world_size=2), on_cuda=False)["zero_optimization"]
    assert "reduce_scatter" not in two and two["reduce_bucket_size"] == 256 * 256  # DeepSpeed's default: scatter
    preset = load_preset(preset_path(_cfg()))
    preset["zero_optimization"]["reduce_scatter"] = True
    path = tmp_path / "scatter.json"
    path.write_text(json.dumps(preset))
    kept = build_ds_config(_cfg(f"parallel.ds_preset={path}"), on_cuda=False)["zero_optimization"]
    assert kept["reduce_scatter"] is True  # a preset's own value stays
    assert kept["reduce_bucket_size"] == ONE_RANK_REDUCE_BUCKET  # fewer reductions either way


def test_one_rank_zero3_trains_bit_for_bit_alike_with_or_without_the_scatter(tmp_path):
    """The all-reduce path at one rank changes how many copies the gradients go through, never
    their values: the same losses, to the last bit, as DeepSpeed's reduce-scatter path, also when
    micro-batches' gradients are added up (2 per step)."""
    from calm_dist.training.golden import run_losses
    from tests.train_utils import prepared_corpus_overrides, train

    data = prepared_corpus_overrides(tmp_path / "data")
    preset = load_preset(preset_path(_cfg()))
    preset["zero_optimization"]["reduce_scatter"] = True
    scatter = tmp_path / "scatter.json"
    scatter.write_text(json.dumps(preset))
    losses = {}
    for name, extra in (("all_reduce", []), ("scatter", [f"parallel.ds_preset={scatter}"])):
        out = tmp_path / name
        train(data, "tiny_baseline", out, "training.train_steps=4", "training.eval_interval=1000",
              "training.global_batch_size=8", *extra)
        losses[name] = run_losses(out)
        saved = json.loads((out / "ds_config.json").read_text())
        assert saved["zero_optimization"]["reduce_scatter"] is (name == "scatter")
        assert saved["gradient_accumulation_steps"] == 2
    assert sorted(losses["all_reduce"]) == [1, 2, 3, 4]
    assert losses["all_reduce"] == losses["scatter"]
