"""Learning-dynamics lab: a stand-alone single-process CALM loop for the experiments in
docs/learning.md (why the trunk collapses, what prevents it). Not the trainer: no DeepSpeed, no
checkpoints; the same model classes, data and loss, with the knobs under study exposed.

    python tools/learning_lab.py --config quickstart_calm --data runs/lab/data --ae runs/lab/ae/autoencoder \
        --steps 400 --order shuffled --lr-mult backbone=0.1 --delay backbone=100

Prints one JSON line per evaluation: held-out energy, the unconditional level, Brier-1..4 (teacher
forced), and the collapse metric (mean pairwise cosine of the backbone's final states).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from calm_dist.config import load_config
from calm_dist.config.validate import validate
from calm_dist.data.loader import read_eval_blocks
from calm_dist.ops.brier import BrierAccumulator
from calm_dist.ops.collapse import mean_pairwise_cosine
from calm_dist.models.scoring import calm_block_terms
from calm_dist.models.autoencoder_io import load_autoencoder
from calm_dist.models.calm import CALM, unconditional_energy
from calm_dist.parallel.state import ensure_model_parallel
from calm_dist.engines.optimizer import build_optimizer

TRUNK = ("embeddings", "compressor", "backbone")  # every module group but the head


def group_overrides(items, key: str) -> list[str]:
    """--lr-mult/--delay GROUP=VALUE (GROUP `trunk`: the three trunk groups) -> config overrides."""
    out = []
    for item in items or []:
        group, value = item.split("=")
        out += [f"optimizer.{key}.{g}={value}" for g in (TRUNK if group == "trunk" else (group,))]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="quickstart_calm")
    p.add_argument("--data", required=True, help="directory with train/ and valid/ shards")
    p.add_argument("--ae", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--order", choices=("sequential", "shuffled", "fixed"), default="sequential")
    p.add_argument("--lr-mult", action="append", help="group=multiplier (trunk = all but head)")
    p.add_argument("--delay", action="append", help="group=steps with LR 0 (trunk = all but head)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="extra dotted config overrides (e.g. optimizer.schedule=cosine)")
    args = p.parse_args(argv)

    overrides = [f"training.autoencoder_path={args.ae}", f"training.train_steps={args.steps}", *args.set,
                 *group_overrides(args.lr_mult, "lr_multipliers"), *group_overrides(args.delay, "lr_delay_steps")]
    if args.lr is not None:
        overrides.append(f"optimizer.lr={args.lr}")
    if args.warmup is not None:
        overrides.append(f"optimizer.warmup_steps={args.warmup}")
    cfg = validate(load_config([args.config], overrides))
    batch = args.batch or cfg.training.micro_batch_size
    ensure_model_parallel(seed=args.seed)  # megatron-core layers need its (single-process) state
    torch.manual_seed(args.seed)
    ae = load_autoencoder(args.ae, expected=cfg.autoencoder)
    model = CALM(cfg.model, ae)
    block = cfg.derived.block_tokens
    train = read_eval_blocks(f"{args.data}/train", block, packing="lm")
    valid = read_eval_blocks(f"{args.data}/valid", block, max_blocks=args.eval_blocks)

    opt, sched = build_optimizer(model, cfg)  # the trainer's groups and per-group schedules
    gen = torch.Generator().manual_seed(args.seed)
    perm, cursor = torch.randperm(len(train), generator=gen), 0

    def next_batch(step):
        nonlocal cursor, perm
        if args.order == "fixed":
            return train[:batch]
        if args.order == "sequential":  # consecutive blocks of one stream, like the old loader
            start = (step * batch) % (len(train) - batch)
            return train[start:start + batch]
        if cursor + batch > len(perm):
            perm, cursor = torch.randperm(len(train), generator=gen), 0
        out = train[perm[cursor:cursor + batch]]
        cursor += batch
        return out

    def evaluate(step, train_cos, t0, common_grad=float("nan")):
        model.eval()
        rng = torch.get_rng_state()
        torch.manual_seed(1234)
        with torch.no_grad():
            energy = sum(model(b[None]).loss.item() for b in valid) / len(valid)
            torch.manual_seed(1234)
            marginal = unconditional_energy(model, valid)
            k = cfg.model.patch_size
            h = model.hidden_states(valid[:, :-k])
            cos = mean_pairwise_cosine(h.reshape(-1, h.shape[-1]))
            acc = BrierAccumulator()
            for b in valid:
                acc.update(calm_block_terms(model, b[None]))
            brier = acc.result()
        torch.set_rng_state(rng)
        model.train()
        print(json.dumps({"step": step, "energy": round(energy, 4), "uncond": round(marginal, 4),
                          "gap_pct": round(100 * (marginal - energy) / marginal, 2), "cos_valid": round(cos, 4),
                          "cos_train": round(train_cos, 4), "common_grad": round(common_grad, 4),
                          **{f"b{n}": round(brier[f"brier{n}"], 4) for n in range(1, 5)},
                          "brierlm": round(brier["brierlm"], 2), "min": round((time.time() - t0) / 60, 2)}),
              flush=True)

    t0 = time.time()
    model.train()
    evaluate(0, float("nan"), t0)
    for step in range(1, args.steps + 1):
        tokens = next_batch(step - 1)
        h = model.backbone(model.transformer_inputs(tokens))
        h.retain_grad()
        out = model.loss_from_hidden(h, tokens)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        sched.step()
        if not math.isfinite(out.loss.item()):
            print(json.dumps({"step": step, "error": "non-finite loss"}))
            return 1
        if step % args.eval_every == 0 or step == args.steps:
            g = h.grad.reshape(-1, h.shape[-1])
            # share of the loss gradient on the states that is the same at every position
            common = float(g.mean(0).square().sum() / g.square().sum(1).mean())
            evaluate(step, mean_pairwise_cosine(h.detach().reshape(-1, h.shape[-1])), t0, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
