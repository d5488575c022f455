"""CALM vs the token baseline, forward + backward at equal batch (tokens per step), same backbone.

    python -m bench.core_step --calm calm_m --baseline transformer_m --seq 2048 --batch 4   # GPU
    python -m bench.core_step --calm tiny_calm --baseline tiny_baseline --seq 256 --batch 4  # CPU

Prints milliseconds per step, tokens/s and the ratio measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from calm_dist.config import load_config, validate
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.baseline import TokenBaseline
from calm_dist.models.calm import CALM
from calm_dist.parallel.state import ensure_model_parallel


def _time_steps(model, tokens, steps: int, warmup: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(warmup + steps):
        if i == warmup:
            if tokens.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(tokens).loss
        loss.backward()
        for p in params:
            p.grad = None
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calm", default="tiny_calm")
    parser.add_argument("--baseline", default="tiny_baseline")
    parser.add_argument("--seq", type=int, default=256, help="context tokens per sequence")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)

    ensure_model_parallel()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = {}
    for kind, preset in (("calm", args.calm), ("baseline", args.baseline)):
        cfg = validate(load_config([preset], [f"data.seq_length={args.seq}"]))
        torch.manual_seed(0)
        if kind == "calm":
            model = CALM(cfg.model, Autoencoder(cfg.autoencoder))
        else:
            model = TokenBaseline(cfg.model)
        model = model.to(device=device, dtype=dtype).train()
        tokens = torch.randint(0, cfg.model.vocab_size - 1, (args.batch, cfg.derived.block_tokens), device=device)
        seconds = _time_steps(model, tokens, args.steps, args.warmup)
        results[kind] = {"preset": preset, "ms_per_step": 1e3 * seconds,
                         "tokens_per_s": args.batch * args.seq / seconds}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    results["speedup"] = results["calm"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    results["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    for kind in ("calm", "baseline"):
        r = results[kind]
        print(f"{kind:9s} {r['preset']:14s} {r['ms_per_step']:9.1f} ms/step {r['tokens_per_s']:12.0f} tokens/s")
    print(f"CALM / baseline training throughput: {results['speedup']:.2f}x on {results['device']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
