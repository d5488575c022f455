"""Worker for bench/zero3.py: a real DeepSpeed ZeRO-3 engine (gloo, one process per rank) around
the tiny CALM, built as the trainer builds it (calm_dist.engines.deepspeed_zero). Each rank writes
`<out>/rank<R>.json`: the bytes of its parameter partitions and optimizer state, and its step times.

    torchrun --nproc_per_node 2 bench/workers/zero3_worker.py --out DIR [--steps 3] [--preset tiny_calm]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny_calm")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()

    from calm_dist.parallel.launch import init_distributed, shutdown_distributed

    info = init_distributed()
    import torch.distributed as dist

    from bench.common import build_calm
    from calm_dist.config import load_config, validate
    from calm_dist.engines.deepspeed_config import build_ds_config
    from calm_dist.engines.deepspeed_zero import ZeroEngine
    from calm_dist.parallel.state import current_layout, ensure_model_parallel

    cfg = validate(load_config([args.preset], [f"training.micro_batch_size={args.micro_batch}"]),
                   world_size=info.world_size)
    model = build_calm(cfg, seed=0)
    total_params = sum(tensor_bytes(q) for q in model.parameters())
    trainable = sum(tensor_bytes(q) for q in model.parameters() if q.requires_grad)
    ensure_model_parallel()
    engine = ZeroEngine(model, cfg, build_ds_config(cfg, on_cuda=False), current_layout(), torch.device("cpu")).ds
    g = torch.Generator().manual_seed(1000 + info.rank)
    block = cfg.derived.block_tokens
    times = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size - 1, (args.micro_batch, block), generator=g)
        dist.barrier()
        start = time.perf_counter()
        loss = engine(tokens).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    partitioned = persistent = 0
    for q in engine.module.parameters():
        partitioned += tensor_bytes(q.ds_tensor)
        if getattr(q, "ds_persist", False):  # small parameters ZeRO-3 keeps whole on every rank
            persistent += q.ds_numel * q.element_size()
    zero_opt = engine.optimizer
    master = sum(tensor_bytes(t) for t in getattr(zero_opt, "fp32_partitioned_groups_flat", []))
    moments = sum(tensor_bytes(v) for state in zero_opt.optimizer.state.values() for v in state.values()
                  if isinstance(v, torch.Tensor) and v.numel() > 1)
    record = {
        "rank": info.rank, "world_size": info.world_size, "step_seconds": times,
        "model_param_bytes": total_params, "trainable_param_bytes": trainable,
        "param_partition_bytes": partitioned, "persistent_param_bytes": persistent,
        "optimizer_master_bytes": master, "optimizer_moment_bytes": moments,
        "tokens_per_step_per_rank": args.micro_batch * cfg.data.seq_length,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(record, indent=2))
    shutdown_distributed(clean=True)  # the barrier, then no gloo teardown left to interpreter exit


if __name__ == "__main__":
    main()
