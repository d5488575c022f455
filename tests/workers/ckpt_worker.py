"""Worker for tests/test_checkpoint.py: real DeepSpeed ZeRO-3 engines, gloo, one process per rank.

Two phases, one torchrun launch each, sharing `--save-dir`:
- `train`: train steps 1..5 from seed 0, saving after steps 1-3 (keep_last=2), and record the
  losses of steps 4 and 5 (the uninterrupted reference); then save step 5 with a hook that kills
  rank 0 after every file is written and before the rename (a crash in the middle of a save).
- `resume`: from what the crash left, load the newest complete checkpoint into fresh engines and
  continue, with and without restoring RNG; error cases; a weights-only load; re-save and pruning;
  a stop signal on rank 1 only.
Each rank writes `<out>/rank<R>.json` with what it saw; the test asserts on those.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_dist.parallel.launch import init_distributed, shutdown_distributed
from calm_dist.checkpoint.manager import CheckpointManager, consolidate_fp32
from calm_dist.checkpoint.stateful import Recorded
from calm_dist.training.rng import RngStreams
from calm_dist.training.signals import StopRequest

VOCAB, HIDDEN, BATCH, SEQ = 64, 128, 4, 16
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": BATCH,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000,
}
RUN_CONFIG = {"model": {"hidden_size": HIDDEN, "vocab_size": VOCAB}, "parallel": {"zero_stage": 3}}
LAST_STEP = 5


class NoisyMLP(nn.Module):
    """Embedding + MLP that draws from the global torch RNG (noise and dropout), like CALM's
    energy head, so that an exact resume needs the RNG state back."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, VOCAB)
        self.dropout = nn.Dropout(0.2)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + 0.1 * torch.rand_like(h)
        h = self.dropout(torch.relu(self.fc1(h)))
        return F.cross_entropy(self.fc2(h).flatten(0, 1), labels.flatten())


def build_engine(seed: int):
    import deepspeed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = NoisyMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine


def train_step(engine, step: int, rank: int) -> float:
    # Data depends only on (step, rank): the "data position" is the step.
    generator = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    return loss.item()


def gathered_weights(engine) -> dict[str, torch.Tensor]:
    """Full weights (a collective under ZeRO-3)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def save(manager: CheckpointManager, engine, step: int) -> str:
    return manager.save(engine, step, {"config": RUN_CONFIG},
                        {"rng": RngStreams(), "next_step": Recorded(lambda: step + 1)})


def phase_train(save_dir: str, rank: int, world: int, out: dict) -> None:
    manager = CheckpointManager(save_dir, keep_last=2, rank=rank, world_size=world)
    engine = build_engine(seed=0)
    params = list(engine.module.parameters())
    out["local_numel"] = sum(p.ds_tensor.numel() for p in params)
    out["total_numel"] = sum(p.ds_numel for p in params)
    out["visible_numel"] = sum(p.numel() for p in params)  # 0 when partitioned
    losses = {}
    for step in range(1, LAST_STEP + 1):
        losses[step] = train_step(engine, step, rank)
        if step <= 3:
            save(manager, engine, step)
        if step == 3:
            live = gathered_weights(engine)
            if rank == 0:
                out["consolidated_vs_live"] = max_diff(consolidate_fp32(save_dir, "global_step3"), live)
            out["tags_after_3"] = manager.tags()
    out["losses"] = losses
    write(out)  # before the crash

    crashing = CheckpointManager(save_dir, keep_last=2, rank=rank, world_size=world, before_commit=lambda: os._exit(1))
    save(crashing, engine, LAST_STEP)
    out["survived_crash"] = True  # must never be written


def phase_resume(save_dir: str, rank: int, world: int, out: dict) -> None:
    import torch.distributed as dist

    partial = os.path.join(save_dir, f"global_step{LAST_STEP}.partial")
    manager = CheckpointManager(save_dir, keep_last=2, rank=rank, world_size=world)
    dist.barrier()  # rank 0 has cleaned up
    out["partial_left"] = os.path.exists(partial)
    tag = out["resolved"] = manager.resolve(-1)

    # Exact resume: new engine with another seed, load, restore RNG, continue.
    resumed = build_engine(seed=1)
    meta, rank_state = manager.load(resumed, tag, pieces={"rng": RngStreams()})
    out["meta_step"], out["meta_world_size"], out["meta_config"] = meta["step"], meta["world_size"], meta["config"]
    out["resumed_losses"] = {s: train_step(resumed, s, rank) for s in range(rank_state["next_step"], LAST_STEP + 1)}

    # The same without restoring RNG: the noise and dropout differ.
    no_rng = build_engine(seed=2)
    _, rank_state = manager.load(no_rng, tag)
    out["no_rng_losses"] = {s: train_step(no_rng, s, rank) for s in range(rank_state["next_step"], LAST_STEP + 1)}

    out["errors"] = {}
    try:
        manager.resolve(7)
    except FileNotFoundError as exc:
        out["errors"]["missing_step"] = str(exc)
    try:
        CheckpointManager(save_dir, keep_last=2, rank=rank, world_size=3).load(no_rng, tag)
    except ValueError as exc:
        out["errors"]["world_size"] = str(exc)

    # Weights only, from a checkpoint that `latest` does not name (DeepSpeed alone would load `latest`).
    weights_only = build_engine(seed=3)
    manager.load(weights_only, "global_step2", load_optimizer=False)
    live = gathered_weights(weights_only)
    if rank == 0:
        out["weights_only_vs_step2"] = max_diff(live, consolidate_fp32(save_dir, "global_step2"))
        out["weights_only_vs_step3"] = max_diff(live, consolidate_fp32(save_dir, "global_step3"))

    # Save the resumed run at step 5, then again at the same step (re-save), with pruning.
    save(manager, resumed, LAST_STEP)
    out["tags_after_save"] = manager.tags()
    save(manager, resumed, LAST_STEP)
    out["tags_after_resave"] = manager.tags()
    out["latest"] = open(os.path.join(save_dir, "latest")).read()
    out["leftovers"] = sorted(n for n in os.listdir(save_dir) if n.endswith((".partial", ".stale")))

    # A signal reaches rank 1 only; both ranks agree to stop.
    with StopRequest() as stop:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        out["local_reason"] = stop.reason()
        out["agreed_reason"] = stop.agreed_reason()


def write(out: dict) -> None:
    with open(os.path.join(out["out_dir"], f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("train", "resume"), required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    info = init_distributed(device="cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out = {"rank": info.rank, "out_dir": args.out}
    phase = phase_train if args.phase == "train" else phase_resume
    phase(args.save_dir, info.rank, info.world_size, out)
    write(out)
    shutdown_distributed(clean=True)  # as calm-train does: no gloo teardown left to interpreter exit


if __name__ == "__main__":
    main()
