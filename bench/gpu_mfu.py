"""`--gpu`: model FLOPs utilisation on one GPU, bf16, for each attention backend installed.

Transformer-M/L and CALM-M/L/XL at the paper's shapes (Llama-3 vocabulary, context 2048 model
steps: 2048 tokens for the baselines, 2048 chunks = 8192 tokens for CALM). One training step =
forward + backward of the loss (no optimizer), micro batch `--gpu-batch`. MFU = our formula's
training FLOPs per token x tokens/s / the device's dense bf16 peak (calm_dist/flops.py's table).
Without CUDA the set is skipped, and says so. It has not been run on a GPU from this repository's
CPU machines: its first GPU run is its test.
"""

from __future__ import annotations

import time

import torch

from bench.common import build_baseline, build_calm, job_config, time_interleaved
from bench.report import BenchResult
from calm_dist.flops import mfu_percent, peak_tflops, training_flops_per_token

NAME = "gpu"
MODELS = ["transformer_m", "transformer_l", "calm_m", "calm_l", "calm_xl"]
BACKENDS = ["te", "flash_attn", "sdpa", "local"]


def available_backends() -> list[str]:
    from calm_dist.models.attention import _importable

    return [b for b in BACKENDS if b in ("sdpa", "local") or _importable(b)]


def measure(preset: str, backend: str, batch: int, repeats: int) -> dict:
    cfg = job_config(preset, ["training.precision=bf16"])
    device = torch.device("cuda")
    with torch.device(device):
        if cfg.training.stage == "calm":
            model = build_calm(cfg, attention_backend=backend)
        else:
            model = build_baseline(cfg, attention_backend=backend)
    model = model.to(device=device, dtype=torch.bfloat16).train()
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (batch, cfg.derived.block_tokens), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model(tokens).loss.backward()
        for p in params:
            p.grad = None

    torch.cuda.reset_peak_memory_stats()
    seconds = time_interleaved({"step": step}, repeats=repeats, warmup=2, device=device)["step"]
    flops = training_flops_per_token(cfg)
    tokens_per_s = batch * cfg.data.seq_length / seconds
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, "bf16")
    out = {"preset": preset, "backend": backend, "batch": batch, "ms_per_step": 1e3 * seconds,
           "tokens_per_s": tokens_per_s, "flops_per_token": flops, "tflops": flops * tokens_per_s / 1e12,
           "peak_tflops": peak, "mfu_percent": mfu_percent(flops, tokens_per_s, peak),
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "device": name}
    return out  # the model and its tokens go with this frame; run() then empties the cache


def run(quick: bool = False, batch: int = 1) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    if not torch.cuda.is_available():
        result.skipped = "no CUDA device on this machine: the --gpu set (MFU, bf16, per attention backend) did not run"
        return result
    backends = available_backends()
    result.details = {"device": torch.cuda.get_device_name(0), "backends": backends, "runs": []}
    for preset in MODELS:
        for backend in backends:
            try:
                m = measure(preset, backend, batch, repeats=3 if quick else 5)
            except Exception as err:  # noqa: BLE001 - one model/backend failing (e.g. OOM) must not hide the others
                torch.cuda.empty_cache()
                result.add(f"{preset}, {backend}: MFU", None, "%", "", None, f"failed: {type(err).__name__}: {err}"[:300])
                continue
            torch.cuda.empty_cache()
            result.details["runs"].append(m)
            result.add(f"{preset}, {backend}: MFU (bf16, batch {batch})", m["mfu_percent"], "%", "", None,
                       f"{m['tokens_per_s']:,.0f} tokens/s, {m['tflops']:.0f} TFLOP/s of {m['peak_tflops']}, "
                       f"{m['ms_per_step']:.0f} ms/step, {m['max_memory_gib']:.1f} GiB")
    result.seconds = time.perf_counter() - start
    return result
