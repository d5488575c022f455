"""DeepSpeed engine construction: the merged DeepSpeed config, the optimizer and the LR schedule.

The `ds_configs/*.json` presets (package data in calm_dist/ds_configs/; `ds_configs` at the
repository root links there) hold the ZeRO settings only; the batch fields, clipping and precision
are always filled from our validated config (the single source of truth), and the ZeRO-3 buckets
are sized from the model's hidden size.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from calm_dist.config import rules
from calm_dist.config.schema import JobConfig
from calm_dist.optim import param_groups
from calm_dist.parallel.zero3 import register_tied_weights

logger = logging.getLogger(__name__)

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
    if not on_cuda:
        # CPU runs: offloading to the CPU is meaningless and would JIT-compile DeepSpeedCPUAdam.
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return ds


def lr_lambda(cfg: JobConfig, delay_steps: int = 0):
    """Linear warmup to optimizer.lr, then constant or cosine decay to optimizer.min_lr.

    With a delay D the factor is 0 for the first D steps; then the same schedule runs over the
    remaining train_steps - D steps (warmup from step D, a cosine still reaching min_lr at the end).
    """
    opt, total = cfg.optimizer, max(1, cfg.training.train_steps - delay_steps)

    def factor(step: int) -> float:
        if step < delay_steps:
            return 0.0
        step -= delay_steps
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - opt.warmup_steps) / max(1, total - opt.warmup_steps))
        floor = opt.min_lr / opt.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: JobConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per parameter group (each scales its own lr), so that a module group can have
    its `optimizer.lr_delay_steps`. During a delay AdamW still steps the group with lr 0, which
    AdamW (torch's; apex's FusedAdam in AdamW mode) turns into neither update nor decay: both are
    multiplied by lr, so the weights stay bit-identical. Its moments keep averaging the group's
    gradients, which is harmless, even useful: the group starts with warm, bias-corrected moments
    instead of a cold start. Its gradients still count in the global clipping norm."""
    delays = cfg.optimizer.lr_delay_steps
    lambdas = [lr_lambda(cfg, delays.get(group["module_group"], 0)) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def build_optimizer(model: torch.nn.Module, cfg: JobConfig):
    """torch AdamW (or apex FusedAdam when installed and on CUDA) and its LR schedule."""
    opt = cfg.optimizer
    groups = param_groups(model, cfg)
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    optimizer, name = None, "torch AdamW"
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam  # lazy: optional (NVIDIA apex, see requirements-gpu.txt)

            optimizer, name = FusedAdam(groups, adam_w_mode=True, **kwargs), "apex FusedAdam (AdamW mode)"
        except ImportError:
            pass
    if optimizer is None:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    logger.info("optimizer: %s", name)
    return optimizer, lr_scheduler(optimizer, cfg)


def create_engine(model: torch.nn.Module, cfg: JobConfig, ds_config: dict):
    import deepspeed  # lazy: after init_distributed's DS_ACCELERATOR; calm-train imports this module to validate

    optimizer, scheduler = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if ds_config["zero_optimization"]["stage"] == 3:
        register_tied_weights(engine.module)
    return engine
