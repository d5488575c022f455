"""Worker for tests/test_eval_generate.py: the baseline's BrierLM under ZeRO-3 on 2 ranks, gloo.

Each rank holds only its shard of a tiny baseline whose output layer is scaled up (peaked
distributions, so the two draws often agree and some rollouts go three tokens deep). The ranks
score different blocks, so their rollouts need different numbers of rows and calls (5 and 4
here); the lockstep must still pair every gathered forward. Each rank writes `<out>/rank<R>_by<N>.json`: the reduced Brier terms
scoring its blocks one at a time and both in one forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch

from calm_dist.config import load_config, validate
from calm_dist.evaluation.scorer import score_blocks
from calm_dist.models.baseline import TokenBaseline
from calm_dist.parallel.launch import init_distributed, shutdown_distributed
from calm_dist.parallel.state import ensure_model_parallel

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1_000_000,
}


def tiny_peaked_baseline(seed: int) -> TokenBaseline:
    cfg = validate(load_config(["tiny_baseline"], [
        "model.vocab_size=97", "model.pad_token_id=96", "model.bos_token_id=0", "model.eos_token_id=0",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=172", "model.num_attention_heads=4",
        "model.max_position_embeddings=64", "data.seq_length=64"]))
    torch.manual_seed(seed)
    model = TokenBaseline(cfg.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = init_distributed("cpu")
    ensure_model_parallel()
    model = tiny_peaked_baseline(seed=0)
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, model_parameters=[])
    sharded = engine.module
    assert all(p.ds_tensor.numel() < p.ds_numel for p in sharded.parameters() if p.ds_numel > 1)  # partitioned

    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 96, (4, 33), generator=generator)
    mine = blocks[info.rank :: info.world_size]
    for blocks_per_forward in (1, 2):  # block by block, and both of a rank's blocks in one forward
        tally = score_blocks(sharded, "baseline", mine, seed=5, device=torch.device("cpu"), rank=info.rank,
                             world_size=info.world_size, lockstep=True, blocks_per_forward=blocks_per_forward)
        result = {name: tally.brier[name].state().tolist() for name in tally.brier}
        result["loss"] = tally.sums["loss"]
        (args.out / f"rank{info.rank}_by{blocks_per_forward}.json").write_text(json.dumps(result))
    shutdown_distributed(clean=True)


if __name__ == "__main__":
    main()
