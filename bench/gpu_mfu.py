"""`--gpu`: model FLOPs utilisation on one GPU, bf16, for each attention backend installed, beside
Hugging Face transformers' Llama at the same backbone shapes; and baseline generation against
`LlamaForCausalLM.generate` on the GPU.

Transformer-M/L and CALM-M/L/XL at the paper's shapes (Llama-3 vocabulary, context 2048 model
steps: 2048 tokens for the baselines, 2048 chunks = 8192 tokens for CALM). One training step =
forward + backward of the loss (no optimizer), micro batch `batch` (4, the paper's), weights in
bf16. MFU = our formula's training FLOPs per token x tokens/s / the device's dense bf16 peak
(calm_dist/flops.py's table).

The peer of each model is transformers' `LlamaForCausalLM` (sdpa attention, bf16) with that
model's backbone (layers, width, heads, MLP) and vocabulary over the same 2048 positions: for
Transformer-M/L exactly our baseline, for CALM-M/L/XL the token model of the same backbone. Its
MFU uses the same formula (the baseline's). transformers is a benchmark-only dependency
(requirements-bench.txt). Without CUDA the set is skipped, and says so.
"""

from __future__ import annotations

import time

import torch

from bench.common import build_baseline, build_calm, job_config, time_interleaved
from bench.report import BenchResult, at_least
from calm_dist.flops import mfu_percent, peak_tflops, training_flops_per_token

NAME = "gpu"
MODELS = ["transformer_m", "transformer_l", "calm_m", "calm_l", "calm_xl"]
BACKENDS = ["te", "flash_attn", "sdpa", "local"]
BATCH = 4
GENERATION_PRESET = "transformer_m"
GENERATION_TOKENS = 128


def available_backends() -> list[str]:
    from calm_dist.models.attention import _importable

    return [b for b in BACKENDS if b in ("sdpa", "local") or _importable(b)]


def _time_training_step(model, loss_of, tokens, repeats: int, device) -> float:
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss_of(model, tokens).backward()
        for p in params:
            p.grad = None

    return time_interleaved({"step": step}, repeats=repeats, warmup=2, device=device)["step"]


def _figures(cfg, batch: int, seconds: float, device) -> dict:
    flops = training_flops_per_token(cfg)
    tokens_per_s = batch * cfg.data.seq_length / seconds
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, "bf16")
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"batch": batch, "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens_per_s, "flops_per_token": flops,
            "tflops": flops * tokens_per_s / 1e12, "peak_tflops": peak,
            "mfu_percent": mfu_percent(flops, tokens_per_s, peak) if peak else float("nan"),
            "max_memory_gib": memory, "device": name}


def _reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(preset: str, backend: str, batch: int, repeats: int, device=torch.device("cuda"),
            overrides: tuple[str, ...] = ()) -> dict:
    """calm-dist's training step (forward + backward of the loss) at `preset`'s shape, bf16."""
    cfg = job_config(preset, ["training.precision=bf16", *overrides])
    with torch.device(device):
        if cfg.training.stage == "calm":
            model = build_calm(cfg, attention_backend=backend)
        else:
            model = build_baseline(cfg, attention_backend=backend)
    model = model.to(device=device, dtype=torch.bfloat16).train()
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (batch, cfg.derived.block_tokens), device=device)
    _reset_memory(device)
    seconds = _time_training_step(model, lambda m, t: m(t).loss, tokens, repeats, device)
    return {"preset": preset, "backend": backend, **_figures(cfg, batch, seconds, device)}


def peer_config(preset: str, overrides: tuple[str, ...] = ()):
    """The token baseline's config with `preset`'s backbone and vocabulary over its context in model
    steps: what transformers' Llama is measured at beside `preset`."""
    cfg = job_config(preset, overrides)
    if cfg.training.stage == "baseline":
        return cfg
    m = cfg.model
    shape = [f"model.{field}={getattr(m, field)}" for field in
             ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings")]
    return job_config("tiny_baseline" if preset.startswith("tiny") else "transformer_m",
                      [*shape, f"data.seq_length={m.max_position_embeddings}"])


def measure_peer(preset: str, batch: int, repeats: int, device=torch.device("cuda"),
                 overrides: tuple[str, ...] = ()) -> dict:
    """transformers' `LlamaForCausalLM` training step at `peer_config(preset)`, bf16, sdpa."""
    from transformers import LlamaForCausalLM  # lazy: benchmark-only dependency

    from bench.peers import llama_config

    cfg = peer_config(preset, overrides)
    torch.manual_seed(0)
    with torch.device(device):
        peer = LlamaForCausalLM(llama_config(cfg.model))
    peer = peer.to(dtype=torch.bfloat16).train()
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (batch, cfg.data.seq_length), device=device)
    _reset_memory(device)
    seconds = _time_training_step(peer, lambda m, t: m(input_ids=t, labels=t).loss, tokens, repeats, device)
    return {"preset": preset, "backend": "transformers (sdpa)", "peer_shape": {
        "num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
        "seq_length": cfg.data.seq_length}, **_figures(cfg, batch, seconds, device)}


def generation_vs_transformers(result: BenchResult, repeats: int, preset: str = GENERATION_PRESET,
                               new_tokens: int = GENERATION_TOKENS, device=torch.device("cuda"),
                               overrides: tuple[str, ...] = (), dtype: torch.dtype = torch.bfloat16,
                               modes: tuple[bool, ...] = (True, False)) -> None:
    """Baseline generation tokens/s on the GPU, calm-dist against `LlamaForCausalLM.generate`, the
    same weights (bf16; fp32 to check greedy agreement without bf16's rounding), batch 1 and 8,
    greedy and sampled (bench/peers.py's measurement)."""
    from bench.peers import TARGET, measure as measure_generation, to_transformers

    with torch.no_grad():
        ours = build_baseline(job_config(preset, ["training.precision=bf16", *overrides])).eval()
        peer = to_transformers(ours).to(device=device, dtype=dtype)
        ours = ours.to(device=device, dtype=dtype)
        precision = str(dtype).replace("torch.", "")
        for batch in (1, 8):
            for greedy in modes:
                m = measure_generation(ours, peer, batch, new_tokens, greedy, repeats, device=str(device),
                                       require_identical=False)
                mode = "greedy" if greedy else "sampled"
                result.details["runs"].append({"preset": preset, "generation": mode, "dtype": precision, **m})
                note = f"{m['ours_tokens_per_s']:,.0f} vs {m['transformers_tokens_per_s']:,.0f} tokens/s"
                if greedy:
                    note += (f"; {m['greedy_agreement']:.0%} of rows identical, the first "
                             f"{m['greedy_common_prefix']:.1f} of {new_tokens} tokens on average")
                result.add(f"{preset}: generation on {device.type} ({precision}), batch {batch}, {mode}: calm-dist / "
                           "transformers tokens/s", m["ratio"], "x", f">= {TARGET:g}x", at_least(m["ratio"], TARGET),
                           note)


def _add_mfu(result: BenchResult, m: dict) -> None:
    result.details["runs"].append(m)
    result.add(f"{m['preset']}, {m['backend']}: MFU (bf16, batch {m['batch']})", m["mfu_percent"], "%", "", None,
               f"{m['tokens_per_s']:,.0f} tokens/s, {m['tflops']:.0f} TFLOP/s of {m['peak_tflops']}, "
               f"{m['ms_per_step']:.0f} ms/step, {m['max_memory_gib']:.1f} GiB")


def _failed(result: BenchResult, what: str, err: Exception, device) -> None:
    _reset_memory(device)
    result.add(what, None, "%", "", None, f"failed: {type(err).__name__}: {err}"[:300])


def run(quick: bool = False, batch: int = BATCH, models: list[str] | None = None, device=None,
        overrides: tuple[str, ...] = (), generation: bool = True) -> BenchResult:
    """`device` and `models` exist for the CPU test of this code (tiny presets); the benchmark itself
    needs CUDA and is skipped, saying so, without it."""
    start = time.perf_counter()
    result = BenchResult(NAME)
    if device is None:
        if not torch.cuda.is_available():
            result.skipped = ("no CUDA device on this machine: the --gpu set (MFU, bf16, per attention backend, "
                              "beside transformers) did not run")
            return result
        device = torch.device("cuda")
    backends = available_backends()
    result.details = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                      "backends": backends, "runs": []}
    repeats = 3 if quick else 5
    for preset in models or MODELS:
        best = None
        for backend in backends:
            try:
                m = measure(preset, backend, batch, repeats, device, overrides)
            except Exception as err:  # noqa: BLE001 - one model/backend failing (e.g. OOM) must not hide the others
                _failed(result, f"{preset}, {backend}: MFU", err, device)
                continue
            _reset_memory(device)
            _add_mfu(result, m)
            best = m if best is None or m["tokens_per_s"] > best["tokens_per_s"] else best
        try:
            peer = measure_peer(preset, batch, repeats, device, overrides)
        except Exception as err:  # noqa: BLE001
            _failed(result, f"{preset}, transformers Llama at its backbone: MFU", err, device)
            continue
        _reset_memory(device)
        _add_mfu(result, peer)
        if best is not None:
            ratio = best["mfu_percent"] / peer["mfu_percent"]
            result.add(f"{preset}: MFU, calm-dist ({best['backend']}) / transformers Llama at its backbone", ratio,
                       "x", "", None, f"{best['mfu_percent']:.1f}% vs {peer['mfu_percent']:.1f}%")
    if generation:
        try:
            shapes = {"preset": "tiny_baseline", "new_tokens": 8} if models else {}
            generation_vs_transformers(result, repeats, device=device, overrides=overrides, **shapes)
            # fp32, TF32 off: do the two generators agree when bf16's rounding cannot flip a near-tie?
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                generation_vs_transformers(result, 1, device=device, overrides=overrides, dtype=torch.float32,
                                           modes=(True,), **shapes)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
        except Exception as err:  # noqa: BLE001
            _failed(result, "generation against transformers", err, device)
    result.seconds = time.perf_counter() - start
    return result
