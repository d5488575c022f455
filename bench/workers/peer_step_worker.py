"""Worker for bench/peers.py: one training step of the token baseline, calm-dist's ZeRO-3 engine
and its 3d engine (megatron-core, TP = PP = 1; both 1 rank, gloo, built as the trainer builds them)
against a plain PyTorch loop around transformers' LlamaForCausalLM holding the same initial
weights, the same AdamW settings, gradient clipping and batches, steps interleaved (ours, 3d,
theirs, ours, ...). Writes `<out>/steps.json`.

    torchrun --nproc_per_node 1 bench/workers/peer_step_worker.py --out DIR [--steps 4] [--preset tiny_baseline]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny_baseline")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()

    from calm_dist.parallel.launch import init_distributed, shutdown_distributed

    init_distributed()
    import torch.nn.functional as F

    from bench.common import build_baseline
    from bench.peers import to_transformers
    from calm_dist.config import load_config, validate
    from calm_dist.engines.deepspeed_config import build_ds_config
    from calm_dist.engines.deepspeed_zero import ZeroEngine
    from calm_dist.engines.megatron_3d import build_3d_engine
    from calm_dist.parallel.state import current_layout, ensure_model_parallel
    from safetensors.torch import save_file

    cfg = validate(load_config([args.preset], args.override), world_size=1)
    ours = build_baseline(cfg, seed=0)
    peer = to_transformers(ours).train()  # a copy of the initial weights, before ZeRO-3 takes ours
    ensure_model_parallel()
    start_weights = Path(args.out) / "start.safetensors"  # the 3d engine starts from them (training.init_weights)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items() if isinstance(v, torch.Tensor)},
              str(start_weights))
    cfg_3d = validate(load_config([args.preset], [*args.override, "parallel.regime=3d", "parallel.zero_stage=0",
                                                  f"training.init_weights={start_weights}"]), world_size=1)
    engine_3d = build_3d_engine(cfg_3d, current_layout(), torch.device("cpu"))
    engine = ZeroEngine(ours, cfg, build_ds_config(cfg, on_cuda=False), current_layout(), torch.device("cpu")).ds
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(peer.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)

    def step_ours(tokens):
        loss = engine(tokens).loss
        engine.backward(loss)
        engine.step()
        return float(loss)

    def step_3d(tokens):
        return engine_3d.train_step(lambda: tokens, on_skip=lambda *skipped: None)["loss"]

    def step_peer(tokens):
        logits = peer(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    g = torch.Generator().manual_seed(1)
    batch, block = cfg.training.micro_batch_size, cfg.derived.block_tokens
    times = {"ours": [], "3d": [], "peer": []}
    first_losses = {}
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size - 1, (batch, block), generator=g)
        for name, fn in (("ours", step_ours), ("3d", step_3d), ("peer", step_peer)):
            start = time.perf_counter()
            loss = fn(tokens)
            if step == 0:
                first_losses[name] = loss  # same weights, same batch: the same first loss
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    record = {"step_seconds": times, "first_losses": first_losses, "tokens_per_step": batch * (block - 1),
              "batch": batch, "seq_length": block - 1}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps(record, indent=2))
    shutdown_distributed(clean=True)


if __name__ == "__main__":
    main()
