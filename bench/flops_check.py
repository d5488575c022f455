"""FLOPs accounting: our formula (calm_dist/flops.py) against torch.utils.flop_counter on a small
model, and against the paper's Table 1 (CALM.md §5.1) for the six published models.

FlopCounterMode counts every matmul (a multiply-add = 2 FLOPs) of a real forward / backward; with
the `local` attention backend megatron's attention matmuls are counted too. The formula counts
attention against the full context, as the counter does for a full (masked) score matrix.
Table 1: training FLOPs in total over 5e11 tokens (CALM.md §5.3) and inference FLOPs per token, at a
context of 2048 model steps.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import build_baseline, build_calm, job_config
from bench.report import BenchResult, at_most
from calm_dist.flops import baseline_flops_per_token, calm_flops_per_token, training_flops_per_token

NAME = "flops"

# Paper Table 1 (CALM.md §5.1): (training FLOPs in total / 1e20, inference FLOPs per token / 1e8).
TABLE_1 = {
    "transformer_s": (6.6, 4.4), "transformer_m": (11.9, 7.9), "transformer_l": (22.5, 15.0),
    "calm_m": (3.7, 2.9), "calm_l": (7.7, 4.6), "calm_xl": (19.5, 9.4),
}
PAPER_TRAIN_TOKENS = 5e11  # 250k steps of "2M" tokens (CALM.md §5.3)
PAPER_CONTEXT = 2048
TOLERANCE = 0.05

# A small model: big enough that every term matters, small enough to count in seconds.
SMALL = ["model.vocab_size=97", "model.pad_token_id=96", "model.bos_token_id=0", "model.eos_token_id=0",
         "model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.intermediate_size=344",
         "model.max_position_embeddings=64", "data.seq_length=64", "autoencoder.hidden_size=128",
         "autoencoder.intermediate_size=320", "autoencoder.latent_size=32", "model.latent_size=32",
         "model.num_target_samples=4"]


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def counter_checks() -> dict[str, tuple[float, float]]:
    """(counted, formula) FLOPs for CALM training and inference and the baseline's forward and training."""
    out = {}
    calm_cfg = job_config("tiny_calm", SMALL + ["training.stage=calm"])
    calm = build_calm(calm_cfg, attention_backend="local")
    k, steps = calm_cfg.model.patch_size, calm_cfg.derived.steps_per_block
    tokens = torch.randint(0, calm_cfg.model.vocab_size - 1, (1, (steps + 1) * k))
    out["CALM training step (fwd + bwd, N=8)"] = (
        counted(lambda: calm(tokens).loss.backward()), training_flops_per_token(calm_cfg) * steps * k)

    def calm_inference():  # every position: backbone over the block, one head sample, one AE decode
        with torch.no_grad():
            h = calm.hidden_states(tokens[:, :-k])
            calm.sample_chunks(h.reshape(-1, h.shape[-1]), 1)

    out["CALM inference (T=1: head + AE decode per step)"] = (
        counted(calm_inference),
        calm_flops_per_token(calm_cfg.model, calm_cfg.autoencoder, steps, training=False) * steps * k)

    base_cfg = job_config("tiny_baseline", SMALL + ["training.stage=baseline"])
    base = build_baseline(base_cfg, attention_backend="local")
    ctx = base_cfg.data.seq_length
    base_tokens = torch.randint(0, base_cfg.model.vocab_size - 1, (2, ctx + 1))
    with torch.no_grad():
        forward = counted(lambda: base.logits(base_tokens[:, :-1]))
    out["baseline forward"] = (forward, baseline_flops_per_token(base_cfg.model, ctx, training=False) * 2 * ctx)
    out["baseline training step (fwd + bwd)"] = (
        counted(lambda: base(base_tokens).loss.backward()), training_flops_per_token(base_cfg) * 2 * ctx)
    return out


def table_1() -> dict[str, dict]:
    out = {}
    for preset, (paper_train, paper_infer) in TABLE_1.items():
        cfg = job_config(preset)
        train = training_flops_per_token(cfg) * PAPER_TRAIN_TOKENS / 1e20
        if preset.startswith("calm"):
            infer = calm_flops_per_token(cfg.model, cfg.autoencoder, PAPER_CONTEXT, training=False) / 1e8
        else:
            infer = baseline_flops_per_token(cfg.model, PAPER_CONTEXT, training=False) / 1e8
        out[preset] = {"train": train, "paper_train": paper_train, "infer": infer, "paper_infer": paper_infer}
    return out


XL_NOTE = ("not met: no prefactors fix it. Any a*trunk + b*head gives an XL/L ratio between the trunk's (2.59) and "
           "the head's (2.77), Table 1 has 19.5/7.7 = 2.53; CALM.md gives nothing that changes XL alone "
           "(its inference figure is within 5%)")


def run(quick: bool = False) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    checks = counter_checks()
    for name, (count, formula) in checks.items():
        error = formula / count - 1
        result.add(f"formula / FlopCounterMode - 1: {name}", 100 * error, "%", "within +-5%",
                   at_most(abs(error), TOLERANCE), f"{formula:.4g} vs {count:.4g} counted")
    rows = table_1()
    for preset, r in rows.items():
        for kind in ("train", "infer"):
            error = r[kind] / r[f"paper_{kind}"] - 1
            met = at_most(abs(error), TOLERANCE)
            what = "training FLOPs total (1e20)" if kind == "train" else "inference FLOPs/token (1e8)"
            note = f"{r[kind]:.2f} vs paper {r[f'paper_{kind}']}"
            if preset == "calm_xl" and kind == "train" and not met:
                note += f"; {XL_NOTE}"
            result.add(f"Table 1 {preset}: {what}, ours / paper - 1", 100 * error, "%", "within +-5%", met, note)
    result.details = {"flop_counter": {k: {"counted": c, "formula": f} for k, (c, f) in checks.items()},
                      "table_1": rows}
    result.seconds = time.perf_counter() - start
    return result
