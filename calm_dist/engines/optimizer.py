"""The one optimizer builder of both engines: AdamW over the project's parameter groups
(`calm_dist.optim`), optionally sharded over the data-parallel group (ZeRO-1, the 3d regime), and
the per-group LR schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from calm_dist.config.schema import JobConfig
from calm_dist.optim import param_groups

logger = logging.getLogger(__name__)


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


def build_optimizer(model: nn.Module, cfg: JobConfig, zero1_group=None, fused: bool = True):
    """AdamW over `model`'s parameter groups (a whole model, or this rank's pipeline chunks) and
    its LR schedule. With `zero1_group` (a data-parallel process group of more than one rank)
    torch's ZeroRedundancyOptimizer shards the moments over it (ZeRO stage 1); otherwise apex
    FusedAdam when installed, on CUDA and `fused`, else torch AdamW. (The 3d engine asks for
    torch's AdamW: its checkpoints name the moments by torch AdamW's per-parameter state.)"""
    opt = cfg.optimizer
    groups = param_groups(model, cfg)
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    optimizer, name = None, "torch AdamW"
    if zero1_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # lazy: ~0.8 s (TorchScript); ZeRO-1 only

        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=zero1_group,
                                            **kwargs)
        name = f"torch AdamW, ZeRO-1 over {zero1_group.size()} data-parallel ranks"
    elif fused and torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam  # lazy: optional (NVIDIA apex, see requirements-gpu.txt)

            optimizer, name = FusedAdam(groups, adam_w_mode=True, **kwargs), "apex FusedAdam (AdamW mode)"
        except ImportError:
            pass
    if optimizer is None and fused:
        # torch's own fused kernel (CPU and CUDA): one pass over each tensor instead of the
        # single-tensor loop's half-dozen, which on a CPU made ZeRO-3's step twice the plain loop's.
        optimizer, name = torch.optim.AdamW(groups, fused=True, **kwargs), "torch AdamW (fused)"
    if optimizer is None:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    logger.info("optimizer: %s", name)
    return optimizer, lr_scheduler(optimizer, cfg)
