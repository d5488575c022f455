"""Data pipeline throughput against what training consumes, measured in the same run.

    python -m bench.data_bench                 # prepare the bundled corpus, time the loader and a tiny step
    python -m bench.data_bench --consumption-tokens-per-s 5e4   # compare with a given training rate

Prints:
  prepared tokens/s  text -> shards, the bundled corpus (12 MB), GPT-2 BPE through tiktoken with
                     --threads threads (target >= 1M tokens/s), and a trained 4096-token BPE (HF)
  loader tokens/s    LongTensor batches out of build_train_loader for the tiny preset's shape
                     (micro batch 8 x block 260, CALM stage), with --workers worker processes
  consumption        tokens/s one tiny_calm training step consumes (forward + backward + AdamW on
                     this machine's CPU, micro batch 8 x 260 tokens), unless given
  ratio              loader / consumption (target >= 10x)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from calm_dist.data.corpus import bundled_documents, is_held_out
from calm_dist.data.loader import build_train_loader
from calm_dist.data.prepare import BUNDLED_SHARD_TOKENS, prepare_shards
from calm_dist.data.tokenizer import load_gpt2, train_bpe


def prepared_rate(out: Path, tokenizer, threads: int) -> dict:
    docs = bundled_documents()
    prepared = prepare_shards(docs, tokenizer, out, valid_every=10, shard_tokens=BUNDLED_SHARD_TOKENS,
                              num_threads=threads, source="bench")
    s = prepared.stats
    return {"tokens": s["tokens"], "seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"],
            "shards": len(prepared.train.shards)}


def loader_rate(train_dir: Path, block: int, micro_batch: int, workers: int, seconds: float) -> dict:
    loader = build_train_loader(train_dir, block, micro_batch, 0, 1, workers, seed=0)
    for _ in range(3):  # workers started and their first shards read
        next(loader)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(loader)
        batches += 1
    elapsed = time.perf_counter() - start
    loader.close()
    return {"batches": batches, "tokens_per_s": batches * micro_batch * block / elapsed}


def consumption_rate(micro_batch: int, steps: int) -> dict:
    """One tiny_calm training step on this CPU: forward, backward and an AdamW update."""
    from calm_dist.config import load_config, validate
    from calm_dist.models.autoencoder import Autoencoder
    from calm_dist.models.calm import CALM
    from calm_dist.parallel.state import ensure_model_parallel

    ensure_model_parallel()
    cfg = validate(load_config(["tiny_calm"], [f"training.micro_batch_size={micro_batch}"]))
    block = cfg.data.seq_length + cfg.model.patch_size
    torch.manual_seed(0)
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (micro_batch, block))
    for i in range(steps + 1):
        if i == 1:  # the first step allocates
            start = time.perf_counter()
        model(tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / steps
    return {"block_tokens": block, "ms_per_step": 1e3 * seconds, "tokens_per_s": micro_batch * block / seconds}


NAME = "data"


def run(quick: bool = False, threads: int = 2, workers: int = 2, micro_batch: int = 8, block: int = 260):
    """The suite's entry (bench/__main__.py): the same measurements as main(), as a BenchResult."""
    from bench.report import BenchResult, at_least

    start = time.perf_counter()
    result = BenchResult(NAME)
    details: dict = {"threads": threads, "workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        details["prepare_gpt2_tiktoken"] = prepared_rate(Path(tmp) / "gpt2", load_gpt2(), threads)
        details["loader"] = loader_rate(Path(tmp) / "gpt2" / "train", block, micro_batch, workers,
                                        2.0 if quick else 5.0)
    details["consumption"] = consumption_rate(micro_batch, 2 if quick else 3)
    ratio = details["loader"]["tokens_per_s"] / details["consumption"]["tokens_per_s"]
    details["loader_over_consumption"] = ratio
    prep = details["prepare_gpt2_tiktoken"]
    result.add(f"text -> shards, GPT-2 BPE (tiktoken, {threads} threads)", prep["tokens_per_s"] / 1e6, "M tokens/s",
               ">= 1 M tokens/s", at_least(prep["tokens_per_s"], 1e6),
               f"{prep['tokens']:,} tokens of the bundled corpus in {prep['seconds']:.1f} s")
    c = details["consumption"]
    result.add(f"loader / training consumption ({workers} workers, {micro_batch} x {block})", ratio, "x", ">= 10x",
               at_least(ratio, 10.0),
               f"loader {details['loader']['tokens_per_s'] / 1e6:.2f} M tokens/s; tiny_calm training step "
               f"(fwd + bwd + AdamW) {c['tokens_per_s'] / 1e3:.1f} k tokens/s")
    result.details = details
    result.seconds = time.perf_counter() - start
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="tokenizer threads (tiktoken)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--block", type=int, default=260, help="tokens per block (tiny CALM: 256 + K=4)")
    p.add_argument("--loader-seconds", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=3, help="tiny training steps timed")
    p.add_argument("--consumption-tokens-per-s", type=float, default=0.0,
                   help="take the training consumption rate as given instead of measuring it")
    p.add_argument("--skip-trained-bpe", action="store_true", help="only time the GPT-2/tiktoken preparation")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)

    results: dict = {"threads": args.threads, "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        results["prepare_gpt2_tiktoken"] = prepared_rate(Path(tmp) / "gpt2", load_gpt2(), args.threads)
        if not args.skip_trained_bpe:
            docs = bundled_documents()
            start = time.perf_counter()
            bpe = train_bpe((d.text for i, d in enumerate(docs) if not is_held_out(i, 10)), 4096)
            train_seconds = time.perf_counter() - start
            results["prepare_bpe4096_hf"] = {**prepared_rate(Path(tmp) / "bpe", bpe, args.threads),
                                             "bpe_training_seconds": train_seconds}
        results["loader"] = loader_rate(Path(tmp) / "gpt2" / "train", args.block, args.micro_batch, args.workers,
                                        args.loader_seconds)
    if args.consumption_tokens_per_s:
        results["consumption"] = {"tokens_per_s": args.consumption_tokens_per_s, "given": True}
    else:
        results["consumption"] = {**consumption_rate(args.micro_batch, args.steps), "given": False}
    results["loader_over_consumption"] = results["loader"]["tokens_per_s"] / results["consumption"]["tokens_per_s"]

    for name in ("prepare_gpt2_tiktoken", "prepare_bpe4096_hf"):
        if name in results:
            r = results[name]
            print(f"{name:22s} {r['tokens']:>9d} tokens in {r['seconds']:6.2f} s = {r['tokens_per_s'] / 1e6:6.2f} M "
                  f"tokens/s ({r['shards']} train shards)")
    if "prepare_bpe4096_hf" in results:
        print(f"{'':22s} (BPE training before that: {results['prepare_bpe4096_hf']['bpe_training_seconds']:.1f} s)")
    print(f"{'loader':22s} {results['loader']['tokens_per_s'] / 1e6:9.2f} M tokens/s "
          f"({args.workers} workers, {args.micro_batch} x {args.block})")
    c = results["consumption"]
    how = "given" if c["given"] else f"measured: tiny_calm, {c['ms_per_step']:.0f} ms/step on CPU"
    print(f"{'training consumption':22s} {c['tokens_per_s'] / 1e3:9.1f} k tokens/s ({how})")
    print(f"loader / consumption: {results['loader_over_consumption']:.0f}x (target >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
