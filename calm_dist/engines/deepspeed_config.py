"""The merged DeepSpeed config of a `zero3` run: a ZeRO preset plus what our config decides.

The `ds_configs/*.json` presets (package data in calm_dist/ds_configs/; `ds_configs` at the
repository root links there) hold the ZeRO settings only; the batch fields, clipping and precision
are always filled from our validated config (the single source of truth), and the ZeRO-3 buckets
are sized from the model's hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

from calm_dist.config import rules
from calm_dist.config.schema import JobConfig

# Inside the package, so that a regular (non-editable) install ships the presets too.
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Keys a preset may set. DeepSpeed silently ignores unknown ones, which hides typos.
_ALLOWED_TOP_LEVEL = {
    "bf16", "fp16", "data_types", "zero_optimization", "zero_allow_untested_optimizer",
    "steps_per_print", "wall_clock_breakdown", "flops_profiler", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "activation_checkpointing", "comms_logger",
    "memory_breakdown", "dump_state",
}
_ALLOWED_ZERO = {
    "stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
    "allgather_partitions", "allgather_bucket_size", "offload_optimizer", "offload_param",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_gather_16bit_weights_on_model_save",
    "sub_group_size", "round_robin_gradients", "zero_hpz_partition_size", "zero_quantized_weights",
    "zero_quantized_gradients", "memory_efficient_linear",
}
# Filled from our config: a preset must not set them (two sources of truth would disagree).
_OURS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "gradient_clipping", "optimizer", "scheduler"}


# ZeRO-3's optimizer steps the fp32 partition one sub-group (a flat tensor of up to this many
# elements) at a time, and torch's AdamW makes temporaries of that size. DeepSpeed's default (1e9:
# one sub-group) suits the GPU's caching allocator; on the CPU, blocks above glibc's mmap threshold
# (32 MiB at most) are mapped afresh at every step and page-faulted through: at 91M parameters
# DeepSpeed's step took 780 ms with one sub-group, 350 ms with 16 MiB ones (the plain loop's AdamW
# 200 ms; bench/peers.py measures the whole training step).
CPU_SUB_GROUP_SIZE = 4_000_000

# With one data-parallel rank there is nothing to scatter: DeepSpeed's all-reduce path works on the
# contiguous gradient bucket in place, where its reduce-scatter path copies every gradient once
# more, and a bucket of this many elements (8 MB in fp32) reduces a few times per step instead of
# once per parameter (h*h holds one weight matrix). Same gradients, bit for bit (tested); the tiny
# one-rank step 1-2% faster (bench/peers.py). With more ranks, reduce-scatter moves half the bytes.
ONE_RANK_REDUCE_BUCKET = 2_000_000


class DeepSpeedPresetError(ValueError):
    """A DeepSpeed preset that cannot be used as it is."""


def preset_path(cfg: JobConfig) -> Path:
    name = cfg.parallel.ds_preset
    if not name:  # the stage itself always comes from parallel.zero_stage
        name = "zero3_offload_bf16" if cfg.parallel.offload_optimizer else "zero3_bf16"
    path = Path(name)
    if path.suffix != ".json":
        path = DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise DeepSpeedPresetError(f"parallel.ds_preset: no DeepSpeed preset {name!r}; available: {available}")
    return path


def load_preset(path: Path) -> dict:
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedPresetError(f"{path}: not valid JSON ({err})") from None
    unknown = set(preset) - _ALLOWED_TOP_LEVEL
    if unknown & _OURS:
        raise DeepSpeedPresetError(
            f"{path}: {sorted(unknown & _OURS)} come from the calm-dist config (training.*, "
            "optimizer.*); remove them from the preset"
        )
    if unknown:
        raise DeepSpeedPresetError(f"{path}: unknown DeepSpeed keys {sorted(unknown)}; allowed: {sorted(_ALLOWED_TOP_LEVEL)}")
    unknown_zero = set(preset.get("zero_optimization", {})) - _ALLOWED_ZERO
    if unknown_zero:
        raise DeepSpeedPresetError(f"{path}: unknown zero_optimization keys {sorted(unknown_zero)}")
    return preset


def build_ds_config(cfg: JobConfig, on_cuda: bool) -> dict:
    """The merged DeepSpeed config for this run (saved with the run and every checkpoint)."""
    ds = load_preset(preset_path(cfg))
    d = cfg.derived
    h = rules.stack_width(cfg)
    ds["train_batch_size"] = d.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.training.micro_batch_size
    ds["gradient_accumulation_steps"] = d.gradient_accumulation_steps
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    ds["bf16"] = {"enabled": cfg.training.precision == "bf16"}
    ds.pop("fp16", None)
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW: no JIT-compiled optimizer op
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.parallel.zero_stage
    if zero["stage"] == 3:
        zero["reduce_bucket_size"] = h * h
        zero["stage3_prefetch_bucket_size"] = int(0.9 * h * h)
        zero["stage3_param_persistence_threshold"] = 10 * h
        if d.data_parallel_size == 1:
            zero["reduce_bucket_size"] = max(h * h, ONE_RANK_REDUCE_BUCKET)
            zero.setdefault("reduce_scatter", False)  # a preset's own value stays
        # Otherwise DeepSpeed replaces torch.nn.functional.linear for the whole process (at
        # deepspeed.initialize as well as under zero.Init) with its own autograd function; ZeRO-3
        # gathers the weights of plain linear layers through its module hooks anyway.
        zero.setdefault("memory_efficient_linear", False)
        if not on_cuda:
            zero.setdefault("sub_group_size", CPU_SUB_GROUP_SIZE)  # a preset's own value stays
    if not on_cuda:
        # CPU runs: offloading to the CPU is meaningless and would JIT-compile DeepSpeedCPUAdam.
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return ds
