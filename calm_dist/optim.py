"""Optimizer parameter groups: one per (module group x decay / no decay), with per-module settings.

Weight decay applies to matrices and embeddings only (CALM.md §9.4): biases and norm weights (every
1-D parameter) get none, as the reference's trainer does. Frozen parameters (the autoencoder inside
CALM) are left out entirely. Each module group (`calm_dist.module_groups`) gets
optimizer.lr x `optimizer.lr_multipliers[group]` and optimizer.weight_decay x
`optimizer.weight_decay_multipliers[group]` (missing entries: 1.0); its LR delay is applied by the
schedule (`calm_dist.engines.optimizer.lr_scheduler`), which reads each group's `module_group`.

The group order is fixed (the stage's module groups in `MODULE_GROUPS` order, decay before no decay,
empty groups dropped), so a resumed run with the same model gets the same groups in the same order
as the optimizer state it loads.
"""

from __future__ import annotations

import logging

from torch import nn

from calm_dist.config.schema import JobConfig
from calm_dist.module_groups import MODULE_GROUPS, module_group

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, cfg: JobConfig) -> list[dict]:
    """The optimizer's parameter groups for `model` (a whole model, a pipeline chunk of it, or a
    ModuleList of chunks), each with `name`, `module_group`, `lr` and `weight_decay`."""
    opt, stage = cfg.optimizer, cfg.training.stage
    members: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # ZeRO-3 built partitioned: the parameter's own tensor is a flat shard; ds_shape is its shape.
        matrix = len(getattr(param, "ds_shape", param.shape)) >= 2
        members.setdefault((module_group(name, stage), matrix), []).append(param)
    groups = []
    for group in MODULE_GROUPS[stage]:
        for decay in (True, False):
            params = members.get((group, decay))
            if not params:  # e.g. the baseline's bias-free lm_head, or a pipeline chunk without it
                continue
            groups.append({
                "params": params,
                "name": f"{group}.{'decay' if decay else 'no_decay'}",
                "module_group": group,
                "lr": opt.lr * opt.lr_multipliers.get(group, 1.0),
                "weight_decay": opt.weight_decay * opt.weight_decay_multipliers.get(group, 1.0) if decay else 0.0,
            })
    _log_groups(groups, opt.lr_delay_steps)
    return groups


def _log_groups(groups: list[dict], delays: dict[str, int]) -> None:
    for group in groups:
        count = sum(getattr(p, "ds_numel", p.numel()) for p in group["params"])  # ZeRO-3: the full size
        delay = delays.get(group["module_group"], 0)
        logger.info("optimizer group %-20s %12s parameters, lr %.3g, weight decay %g%s", group["name"],
                    f"{count:,}", group["lr"], group["weight_decay"], f", LR 0 for the first {delay} steps" if delay else "")
