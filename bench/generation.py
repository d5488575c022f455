"""Generation: CALM (K tokens per step) against the token baseline with the same backbone.

Same prompts, same number of new tokens, KV cache on both (calm_dist.generation); tokens/s at
batch 1 and batch 8, at T = 1 and with the batch temperature sampler (T = 1/2 over N candidates;
the baseline samples softmax(logits / T), which costs the same as T = 1).

The ceiling is not K: a CALM step also runs the input compressor, the energy head and the
autoencoder's decoder, whose vocabulary projection is large (CALM.md §5.3). The limit printed
beside each measured ratio is computed with our FLOPs formula (calm_dist/flops.py): baseline
FLOPs per token over CALM's at the average context of the run. The weight-bytes ratio (parameters
each model reads per token) is printed too: it bounds a weight-streaming (memory-bound) decoder.
At batch 1 on a CPU the per-step overhead (Python, kernel launches) dominates both models, so the
ratio tends towards K and can exceed both limits.
"""

from __future__ import annotations

import time

import torch

from bench.common import build_baseline, build_calm, job_config, parameter_count, time_interleaved
from bench.report import BenchResult, fraction_of_limit
from calm_dist.flops import baseline_flops_per_token, calm_flops_per_token

NAME = "generation"

# (name, CALM preset, baseline preset, overrides for both)
GPT2_VOCAB = ["model.vocab_size=50258", "model.pad_token_id=50257", "model.bos_token_id=50256",
              "model.eos_token_id=50256"]
CONFIGS = {
    "tiny": ("tiny_calm", "tiny_baseline", []),
    "m50k": ("calm_m", "transformer_m", GPT2_VOCAB + ["training.precision=fp32"]),
}
PROMPT_TOKENS = 16
CANDIDATES = 200  # the paper's N for the batch sampler (CALM.md §4.2)


def generation_limits(calm_cfg, base_cfg, context_tokens: int, num_samples: int = 1) -> dict:
    """FLOPs-formula limit (baseline FLOPs per token / CALM's) at `context_tokens`, with
    `num_samples` head samples and AE decodes per CALM step (1 at T = 1, N for the batch sampler)."""
    k = calm_cfg.model.patch_size
    base = baseline_flops_per_token(base_cfg.model, context_tokens, training=False)
    calm = calm_flops_per_token(calm_cfg.model, calm_cfg.autoencoder, max(1, context_tokens // k), training=False,
                                num_samples=num_samples)
    return {"baseline_flops_per_token": base, "calm_flops_per_token": calm, "flops_limit": base / calm}


def weight_reads_per_token(calm, base) -> dict:
    """Parameters read per generated token (one embedding row each is negligible and left out):
    baseline backbone + output layer per token; CALM backbone + compressor + head + AE decoder
    (with its tied vocabulary projection) per step, / K."""
    ae = calm.autoencoder
    decoder = [ae.decoder_in, ae.decoder_chunk_layers, ae.expand, ae.decoder_token_layers, ae.decoder_norm,
               ae.embed_tokens]
    calm_step = parameter_count(calm.backbone, calm.compressor, calm.head, *decoder)
    base_token = parameter_count(base.backbone, base.lm_head)
    k = calm.cfg.patch_size
    return {"baseline_params_per_token": base_token, "calm_params_per_token": calm_step / k,
            "bytes_limit": base_token / (calm_step / k)}


def _prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 1, (batch, PROMPT_TOKENS), generator=g).tolist()


def measure(calm, base, batch: int, new_tokens: int, repeats: int, sampler: str) -> dict:
    from calm_dist.generation import generate_baseline, generate_calm

    k = calm.cfg.patch_size
    prompts = _prompts(batch, calm.cfg.vocab_size, seed=batch)
    if sampler == "T=1":
        calm_kwargs, temperature = {}, 1.0
    else:
        calm_kwargs, temperature = {"temperature": 0.5, "sampler": "batch", "num_candidates": CANDIDATES,
                                    "generator": torch.Generator().manual_seed(0)}, 0.5
    out = {}

    def run_calm():
        out["calm"] = generate_calm(calm, prompts, new_tokens, **calm_kwargs)

    def run_base():
        out["base"] = generate_baseline(base, prompts, new_tokens, pad_multiple=k, temperature=temperature)

    seconds = time_interleaved({"calm": run_calm, "baseline": run_base}, repeats=repeats, warmup=1)
    assert all(len(t) == new_tokens for t in out["calm"].tokens + out["base"].tokens)
    tokens = batch * new_tokens
    result = {
        "batch": batch, "new_tokens": new_tokens, "sampler": sampler,
        "calm_tokens_per_s": tokens / seconds["calm"], "baseline_tokens_per_s": tokens / seconds["baseline"],
        "calm_steps": out["calm"].model_steps, "baseline_steps": out["base"].model_steps,
        "calm_ms_per_step": 1e3 * seconds["calm"] / out["calm"].model_steps,
        "baseline_ms_per_step": 1e3 * seconds["baseline"] / out["base"].model_steps,
    }
    if out["calm"].collision_rates:
        result["collision_rate"] = sum(out["calm"].collision_rates) / len(out["calm"].collision_rates)
    result["ratio"] = result["calm_tokens_per_s"] / result["baseline_tokens_per_s"]
    return result


def run(quick: bool = False, configs: list[str] | None = None, new_tokens: int | None = None,
        repeats: int | None = None) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    torch.set_grad_enabled(False)
    try:
        configs = configs or (["tiny"] if quick else ["tiny", "m50k"])
        # The paper-shape limit, from the formula only (no model needed): CALM-M vs Transformer-M, 50k vocabulary.
        calm_m, trans_m = (job_config(p, CONFIGS["m50k"][2]) for p in CONFIGS["m50k"][:2])
        paper = generation_limits(calm_m, trans_m, 2048)
        result.details["m50k_flops_limit_at_context_2048"] = paper
        result.add("limit at CALM-M / Transformer-M shapes, 50k vocabulary (formula)", paper["flops_limit"], "x",
                   "", None, "FLOPs per token, T=1, context 2048; about 3x expected")
        for name in configs:
            calm_preset, base_preset, overrides = CONFIGS[name]
            calm_cfg, base_cfg = job_config(calm_preset, overrides), job_config(base_preset, overrides)
            calm = build_calm(calm_cfg).eval()
            base = build_baseline(base_cfg).eval()
            tokens = new_tokens or (64 if quick or name != "tiny" else 128)
            reps = repeats or (2 if quick or name != "tiny" else 3)
            weights = weight_reads_per_token(calm, base)
            cases = [(1, "T=1"), (8, "T=1"), (1, f"batch T=1/2 N={CANDIDATES}"), (8, f"batch T=1/2 N={CANDIDATES}")]
            if name != "tiny":  # the batch sampler at 50k vocabulary: 200 decodes per step, minutes on a CPU
                cases = cases[:2]
                tokens = new_tokens or 32
            for batch, sampler in cases:
                m = measure(calm, base, batch, tokens, reps, sampler)
                samples = 1 if sampler == "T=1" else CANDIDATES
                limits = generation_limits(calm_cfg, base_cfg, PROMPT_TOKENS + tokens // 2, samples)
                m.update(limits, **weights)
                result.details[f"{name} b{batch} {sampler}"] = m
                fraction_of_limit(
                    result, f"{name}: batch {batch}, {sampler}: CALM/baseline tokens/s", m["ratio"],
                    limits["flops_limit"],
                    note=(f"{m['calm_tokens_per_s']:,.0f} vs {m['baseline_tokens_per_s']:,.0f} tokens/s; "
                          f"{m['ratio'] / limits['flops_limit']:.0%} of the FLOPs limit; weight-bytes limit "
                          f"{weights['bytes_limit']:.2f}x; ms/step {m['calm_ms_per_step']:.1f} (CALM) vs "
                          f"{m['baseline_ms_per_step']:.1f}"),
                )
            del calm, base
    finally:
        torch.set_grad_enabled(True)
    result.seconds = time.perf_counter() - start
    return result
