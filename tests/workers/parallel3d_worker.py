"""A few 3d-regime training steps on fixed batches, for tests/test_parallel_3d.py.

    torchrun --nproc_per_node 4 tests/workers/parallel3d_worker.py SPEC.json

SPEC: {"preset", "overrides" (dotted), "tokens" (a .pt tensor [steps, dp, accum, micro, T]),
"out"}. The engine is the trainer's own (`build_3d_engine`, started from training.init_weights).
Each rank writes out/rank_R.pt: its layout, the step reports, its gradients after the first step
(per model chunk, keyed like the chunk's weights) and the energy head's first noise draw (last stage, CALM). Rank 0 then
writes a real checkpoint into out/checkpoints through the checkpoint manager; with "reload": true in
SPEC a fresh engine loads it and each rank writes out/reload_R.pt (do weights and moments match).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch


def main(spec_path: str) -> None:
    from calm_dist.config import load_config, validate
    from calm_dist.parallel.launch import init_distributed, shutdown_distributed
    from calm_dist.parallel.state import current_layout, ensure_model_parallel, seed_model_building, seed_training
    from calm_dist.checkpoint.manager import CheckpointManager
    from calm_dist.checkpoint.stateful import Recorded
    from calm_dist.engines.megatron_3d import build_3d_engine
    from calm_dist.training.trainer import TrainState, checkpoint_meta

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    info = init_distributed("cpu")
    cfg = validate(load_config(spec["preset"], spec["overrides"]), world_size=info.world_size)
    par = cfg.parallel
    ensure_model_parallel(par.tensor_parallel, par.pipeline_parallel, cfg.training.seed, par.virtual_pipeline_stages)
    layout = current_layout()
    seed_model_building(cfg.training.seed, layout)
    engine = build_3d_engine(cfg, layout, info.device)
    seed_training(cfg.training.seed, layout)

    noise = []
    head = getattr(engine.chunks[-1].model, "head", None)
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: noise.append(args[1].detach().clone()))

    tokens = torch.load(spec["tokens"], weights_only=True)[:, layout.dp_rank]
    reports, first_grads = [], {}
    for step in range(tokens.shape[0]):
        reports.append(engine.train_batch(list(tokens[step])))
        if step == 0:
            first_grads = {f"chunk{i}": {name: p.grad.clone() for name, p in chunk.model.named_parameters()
                                         if p.grad is not None} for i, chunk in enumerate(engine.chunks)}
    # After training: the next draws of the default generator (hidden dropout, head noise) and of
    # megatron's tensor-parallel tracker (dropout inside split layers).
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    default_draw = torch.rand(8)
    with get_cuda_rng_tracker().fork():
        tracker_draw = torch.rand(8)
    torch.save({"layout": asdict(layout), "reports": reports, "grads": first_grads,
                "grad_norm": engine.get_global_grad_norm(), "noise": noise[0] if noise else None,
                "default_draw": default_draw, "tracker_draw": tracker_draw},
               out / f"rank_{info.rank}.pt")

    state = TrainState(step=tokens.shape[0])
    manager = CheckpointManager(out / "checkpoints", keep_last=0, rank=info.rank, world_size=info.world_size)
    manager.save(engine, state.step, checkpoint_meta(cfg, state, None),
                 {"rank": Recorded(lambda: info.rank)})
    if spec.get("reload"):
        torch.save(_reload(engine, manager, cfg, layout, info), out / f"reload_{info.rank}.pt")
    shutdown_distributed(clean=True)  # as calm-train does: no gloo teardown left to interpreter exit


def _reload(engine, manager, cfg, layout, info) -> dict:
    """A fresh engine loads the checkpoint just saved (same layout): are its weights and this
    rank's AdamW state (under ZeRO-1 its share) the saved engine's?"""
    from calm_dist.engines.megatron_3d import build_3d_engine

    again = build_3d_engine(cfg, layout, info.device)
    manager.load(again, manager.tags()[-1])
    weights = all(torch.equal(a, b) for a, b in zip(engine.params, again.params))
    local, loaded = (getattr(e.optimizer, "optim", e.optimizer) for e in (engine, again))
    with_state = [(local.state[a], loaded.state[b]) for a, b in zip(engine.params, again.params) if a in local.state]
    moments = all(set(old) == set(new) and all(torch.equal(old[k], new[k]) for k in old) for old, new in with_state)
    return {"weights": weights, "moments": moments, "with_state": len(with_state), "params": len(engine.params)}


if __name__ == "__main__":
    main(sys.argv[1])
