"""The `zero3` regime's engine: DeepSpeed ZeRO (stage 1, 2 or 3) around the whole model.

DeepSpeed does the work: it partitions parameters, gradients and optimizer state, accumulates
micro-batches, clips by the global norm, drops a step whose gradient norm is not finite, and writes
its own checkpoint files. This class adds what the trainer needs on top: micro-batches with a
non-finite loss are skipped on every rank before any backward, and a dropped step is noticed, so
that the next batches take their place.
"""

from __future__ import annotations

import logging

import psutil
import torch
import torch.distributed as dist
from torch import nn

from calm_dist.common.dist_env import read_dist_env
from calm_dist.config.schema import JobConfig
from calm_dist.engines.construction_memory import built_param_count, whole_model_refusal
from calm_dist.engines.deepspeed_config import build_ds_config
from calm_dist.engines.initial_weights import load_initial_weights, load_initial_weights_partitioned
from calm_dist.engines.model_build import build_model
from calm_dist.engines.optimizer import build_optimizer
from calm_dist.engines.protocol import NextBatch, OnSkip
from calm_dist.evaluation.in_training import evaluate
from calm_dist.models.kinds import model_kind
from calm_dist.parallel.state import ParallelLayout
from calm_dist.parallel.zero3 import UNIT_NAMES, mark_gather_units, register_tied_weights

logger = logging.getLogger(__name__)


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True only if the value is finite on every rank (all ranks must take the same branch)."""
    flag = torch.tensor([1.0 if torch.isfinite(value).all() else 0.0], device=value.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class ZeroEngine:
    def __init__(self, model: nn.Module, cfg: JobConfig, ds_config: dict, layout: ParallelLayout,
                 device: torch.device):
        import deepspeed  # lazy: deepspeed picks its accelerator on import, after init_distributed's DS_ACCELERATOR

        self.cfg, self.ds_config, self.layout, self.device = cfg, ds_config, layout, device
        self.kind = model_kind(cfg.training.stage)
        optimizer, scheduler = build_optimizer(model, cfg)
        gather = cfg.parallel.zero3_gather
        if ds_config["zero_optimization"]["stage"] == 3 and (units := mark_gather_units(model, gather)):
            logger.info("ZeRO-3 gathers by %s: %d %s, each one unit (parallel.zero3_gather=%s)",
                        gather, units, UNIT_NAMES[gather], gather)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                config=ds_config)
        if self.ds.checkpoint_engine.is_decoupled():
            raise ValueError("a decoupled (asynchronous) DeepSpeed checkpoint engine breaks the atomic saves "
                             "calm-dist relies on: use DeepSpeed's default, synchronous one")
        if ds_config["zero_optimization"]["stage"] == 3:
            register_tied_weights(self.ds.module)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def optimizer(self):
        return self.ds.optimizer

    def train_step(self, next_batch: NextBatch, on_skip: OnSkip) -> dict[str, float]:
        cfg, kind, ds = self.cfg, self.kind, self.ds
        accum = cfg.derived.gradient_accumulation_steps
        losses, extras, done = [], {}, 0
        bad_losses = bad_steps = 0  # in a row: non-finite losses (micro-batches), non-finite gradients (steps)
        while done < accum:
            out = ds(kind.inputs(cfg, next_batch()))
            if not all_ranks_finite(out.loss.detach()):
                # Skip the micro-batch on every rank: no backward, no step; the next batch takes
                # its place, so the weights never see the non-finite values.
                bad_losses += 1
                on_skip(1, bad_losses, "non-finite loss")
                continue
            bad_losses = 0
            ds.backward(out.loss)
            ds.step()
            losses.append(out.loss.item())
            for key, value in kind.step_metrics(out).items():
                extras[key] = extras.get(key, 0.0) + value / accum
            done += 1
            if done == accum and not ds.was_step_applied():
                # Finite losses, non-finite gradients: DeepSpeed dropped the step on every rank (its
                # global norm is not finite) and cleared the gradients; the next batches take its place.
                bad_steps += 1
                on_skip(accum, bad_steps, "non-finite gradients")
                losses, extras, done = [], {}, 0
        grad_norm = ds.get_global_grad_norm()
        # "lr": the largest of the per-module-group lrs (a delayed or scaled group may be group 0).
        return {"loss": sum(losses) / len(losses), **extras,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": max(ds.get_lr())}

    def evaluate(self, blocks_BT: torch.Tensor, level_blocks_BT: torch.Tensor | None) -> dict[str, float]:
        return evaluate(self.module, self.cfg, blocks_BT, self.device, rank=self.layout.dp_rank,
                        world_size=self.layout.data_parallel, level_blocks_BT=level_blocks_BT)

    # -- checkpoints: DeepSpeed's own files -------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = False) -> None:
        self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str | None, dict]:
        return self.ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                       load_lr_scheduler_states=load_lr_scheduler_states)


def build_zero_engine(cfg: JobConfig, layout: ParallelLayout, device: torch.device) -> ZeroEngine:
    """The configured model (started from training.init_weights when given) in DeepSpeed."""
    ds_config = build_ds_config(cfg, on_cuda=device.type == "cuda")
    return ZeroEngine(build_zero_model(cfg, ds_config), cfg, ds_config, layout, device)


def build_zero_model(cfg: JobConfig, ds_config: dict) -> nn.Module:
    """The model for DeepSpeed, started from training.init_weights when given. Under ZeRO-3 with
    parallel.zero_init it is built partitioned: each module's parameters are split across the ranks
    as soon as the module is built, so no rank holds the whole model (CALM's frozen autoencoder is
    read whole from its file, then partitioned with the rest at deepspeed.initialize). Otherwise
    every rank builds it whole, refused first when the node's ranks cannot hold that many copies."""
    if partitioned_construction(cfg):
        import deepspeed  # lazy: deepspeed picks its accelerator on import, after init_distributed's DS_ACCELERATOR

        # (zero.Init takes memory_efficient_linear from the config: build_ds_config turns it off.)
        model = build_model(cfg, construction=lambda: deepspeed.zero.Init(config_dict_or_path=ds_config))
        if cfg.training.init_weights:
            load_initial_weights_partitioned(model, cfg.training.init_weights, rank=dist.get_rank())
        return model
    refusal = whole_model_refusal(built_param_count(cfg), read_dist_env().local_world_size,
                                  psutil.virtual_memory().available)
    if refusal:
        raise ValueError(refusal)
    model = build_model(cfg)
    if cfg.training.init_weights:
        load_initial_weights(model, cfg.training.init_weights)
    return model


def partitioned_construction(cfg: JobConfig) -> bool:
    return cfg.parallel.regime == "zero3" and cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init
