"""Training throughput: CALM against the token baseline with the same backbone and tokens per batch.

One training step = forward + backward of the loss at micro batch B x seq tokens (CALM reads
seq / K chunks and predicts the next; the baseline reads seq tokens), no optimizer (it is the same
backbone for both and would only add a constant). The limit is the FLOPs-formula ratio, baseline
training FLOPs per token over CALM's (calm_dist/flops.py; 11.9e20 / 3.7e20 = 3.2x at the paper's M
shapes). Where CALM's time goes is measured part by part: the frozen autoencoder's encode of the
targets, the trunk (embedding, compressor, backbone) forward + backward, the head with N samples
forward + backward, and the energy loss (M target samples) forward + backward.

    python -m bench.training --calm calm_m --baseline transformer_m --seq 2048 --batch 4   # GPU
    python -m bench.training --calm tiny_calm --baseline tiny_baseline --seq 256 --batch 4  # CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import build_baseline, build_calm, job_config, quiet_imports, time_interleaved
from bench.report import BenchResult, fraction_of_limit, matplotlib_pyplot, save_png
from calm_dist.flops import training_flops_per_token

NAME = "training"

GPT2_VOCAB = ["model.vocab_size=50258", "model.pad_token_id=50257", "model.bos_token_id=50256",
              "model.eos_token_id=50256"]
# name: (CALM preset, baseline preset, overrides for both, seq tokens, micro batch)
CONFIGS = {
    "tiny": ("tiny_calm", "tiny_baseline", [], 256, 4),
    # The largest that fits a few minutes on 2 cores: half of CALM-M's width, GPT-2's vocabulary.
    "small50k": ("tiny_calm", "tiny_baseline", GPT2_VOCAB + [
        "model.hidden_size=512", "model.intermediate_size=1376", "model.num_layers=8",
        "model.num_attention_heads=8", "model.num_mlp_layers=2", "model.max_position_embeddings=512",
        "autoencoder.hidden_size=512"], 512, 2),
}


def _device_dtype():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def build_pair(calm_preset: str, base_preset: str, overrides, seq: int, device, dtype):
    overrides = list(overrides) + [f"data.seq_length={seq}"]
    calm_cfg, base_cfg = job_config(calm_preset, overrides), job_config(base_preset, overrides)
    calm = build_calm(calm_cfg).to(device=device, dtype=dtype).train()
    base = build_baseline(base_cfg).to(device=device, dtype=dtype).train()
    return calm_cfg, base_cfg, calm, base


def step_fn(model, tokens):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model(tokens).loss.backward()
        for p in params:
            p.grad = None

    return step


def calm_parts(calm, tokens) -> dict:
    """The parts of one CALM step as separate calls, to be timed beside the whole step."""
    k, n = calm.cfg.patch_size, calm.cfg.num_samples
    b, t = tokens.shape
    inputs, chunks = tokens[:, :-k], tokens[:, k:].reshape(b, t // k - 1, k)
    with torch.no_grad():
        h = calm.hidden_states(inputs)
        mu, log_sigma = calm.target_posterior(chunks)
    h_PD = h.reshape(-1, h.shape[-1]).detach()
    mu_PL, sigma_PL = mu.reshape(-1, mu.shape[-1]), log_sigma.reshape(-1, mu.shape[-1]).exp()
    grad_h = torch.randn_like(h)
    with torch.no_grad():
        samples = calm.sample_latents(h_PD, n)
    grad_samples = torch.randn_like(samples)

    def trunk():
        calm.hidden_states(inputs).backward(grad_h)

    def head():
        calm.sample_latents(h_PD.requires_grad_(True), n).backward(grad_samples)

    def energy():
        calm._chunked_energy(samples.detach().requires_grad_(True), mu_PL, sigma_PL)[0].backward()

    def encode():
        with torch.no_grad():
            calm.target_posterior(chunks)

    return {"autoencoder encode": encode, "trunk (embedding, compressor, backbone)": trunk,
            f"head, N={n} samples": head, f"energy loss, M={calm.cfg.num_target_samples} targets": energy}


def baseline_parts(base, tokens) -> dict:
    import torch.nn.functional as F

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        h = base.backbone(base.embed_tokens(inputs))
    grad_h = torch.randn_like(h)

    def trunk():
        base.backbone(base.embed_tokens(inputs)).backward(grad_h)

    def output():
        logits = base.lm_head(h.detach().requires_grad_(True))
        F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()

    return {"trunk (embedding, backbone)": trunk, "output layer + cross-entropy": output}


def measure(calm_preset, base_preset, overrides, seq: int, batch: int, repeats: int, breakdown: bool = True) -> dict:
    device, dtype = _device_dtype()
    calm_cfg, base_cfg, calm, base = build_pair(calm_preset, base_preset, overrides, seq, device, dtype)
    g = torch.Generator().manual_seed(0)
    calm_tokens = torch.randint(0, calm_cfg.model.vocab_size - 1, (batch, calm_cfg.derived.block_tokens), generator=g)
    base_tokens = torch.randint(0, base_cfg.model.vocab_size - 1, (batch, base_cfg.derived.block_tokens), generator=g)
    calm_tokens, base_tokens = calm_tokens.to(device), base_tokens.to(device)
    # The parts are timed interleaved with the whole steps, so that load from other jobs falls on all alike.
    fns = {"calm": step_fn(calm, calm_tokens), "baseline": step_fn(base, base_tokens)}
    if breakdown:
        fns.update({("calm", k): v for k, v in calm_parts(calm, calm_tokens).items()})
        fns.update({("baseline", k): v for k, v in baseline_parts(base, base_tokens).items()})
    seconds = time_interleaved(fns, repeats=repeats, warmup=1, device=device)
    calm.zero_grad(set_to_none=True)
    base.zero_grad(set_to_none=True)
    calm_flops, base_flops = training_flops_per_token(calm_cfg), training_flops_per_token(base_cfg)
    tokens = batch * seq
    out = {
        "calm": calm_preset, "baseline": base_preset, "overrides": list(overrides), "seq_tokens": seq, "batch": batch,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "calm_ms_per_step": 1e3 * seconds["calm"], "baseline_ms_per_step": 1e3 * seconds["baseline"],
        "calm_tokens_per_s": tokens / seconds["calm"], "baseline_tokens_per_s": tokens / seconds["baseline"],
        "calm_flops_per_token": calm_flops, "baseline_flops_per_token": base_flops,
        "flops_limit": base_flops / calm_flops,
    }
    out["ratio"] = out["calm_tokens_per_s"] / out["baseline_tokens_per_s"]
    out["calm_gflops_per_s"] = calm_flops * out["calm_tokens_per_s"] / 1e9
    out["baseline_gflops_per_s"] = base_flops * out["baseline_tokens_per_s"] / 1e9
    if breakdown:
        for kind in ("calm", "baseline"):
            out[f"{kind}_breakdown_ms"] = {k[1]: 1e3 * v for k, v in seconds.items() if isinstance(k, tuple)
                                           and k[0] == kind}
    return out


def plot_breakdown(measurements: dict[str, dict], path: Path) -> bool:
    plt = matplotlib_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(measurements) * 2))
    labels, y = [], 0
    for name, m in measurements.items():
        for kind in ("calm", "baseline"):
            left = 0.0
            for part, ms in m[f"{kind}_breakdown_ms"].items():
                ax.barh(y, ms, left=left, label=part if part not in ax.get_legend_handles_labels()[1] else None)
                left += ms
            ax.plot([m[f"{kind}_ms_per_step"]] * 2, [y - 0.4, y + 0.4], color="black")
            labels.append(f"{name}: {kind}")
            y += 1
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("ms per training step (bars: parts timed alone; black line: the whole step)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(quick: bool = False, out_dir: Path | None = None, configs: list[str] | None = None) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    paper_calm, paper_base = job_config("calm_m"), job_config("transformer_m")
    paper_limit = training_flops_per_token(paper_base) / training_flops_per_token(paper_calm)
    result.add("limit at the paper's CALM-M / Transformer-M (formula)", paper_limit, "x", "", None,
               "training FLOPs per token; Table 1: 11.9e20 / 3.7e20 = 3.2x")
    measurements = {}
    for name in configs or list(CONFIGS):
        calm_preset, base_preset, overrides, seq, batch = CONFIGS[name]
        m = measure(calm_preset, base_preset, overrides, seq, batch, repeats=3 if quick else 5)
        measurements[name] = m
        result.details[name] = m
        parts = m["calm_breakdown_ms"]
        where = ", ".join(f"{part.split(' (')[0]} {ms / m['calm_ms_per_step']:.0%}" for part, ms in parts.items())
        figure = fraction_of_limit(
            result, f"{name} (seq {seq} x batch {batch}): CALM/baseline training tokens/s", m["ratio"],
            m["flops_limit"],
            note=(f"{m['calm_tokens_per_s']:,.0f} vs {m['baseline_tokens_per_s']:,.0f} tokens/s, "
                  f"{m['ratio'] / m['flops_limit']:.0%} of the FLOPs limit; CALM step {m['calm_ms_per_step']:.0f} ms, "
                  f"parts timed alone: {where}"),
        )
        for kind in ("calm", "baseline"):
            share = sum(m[f"{kind}_breakdown_ms"].values()) / m[f"{kind}_ms_per_step"]
            if share < 0.7:  # the parts, timed beside the step, should add up to about the step
                figure.note += (f". Noisy: {kind}'s parts add up to only {share:.0%} of its best whole step "
                                "(other jobs on the machine); rerun")
        if figure.met is False:
            energy = next(ms for part, ms in parts.items() if part.startswith("energy"))
            figure.note += (f". Why: the formula counts the energy loss (M x N distances in exact differences, the "
                            f"M target draws) as 0 FLOPs; at this width it is {energy / m['calm_ms_per_step']:.0%} of "
                            "CALM's step (under 1% of the FLOPs at the paper's shapes)")
        result.add(f"{name}: achieved GFLOP/s, CALM / baseline", m["calm_gflops_per_s"], "GFLOP/s", "", None,
                   f"baseline {m['baseline_gflops_per_s']:.1f} GFLOP/s (model FLOPs by our formula)")
    if measurements:
        save_png(result, out_dir, "training_breakdown.png", lambda png: plot_breakdown(measurements, png))
    result.seconds = time.perf_counter() - start
    return result


def main(argv=None) -> None:
    """One pair at given shapes (also behind `python -m bench.core_step`, kept for tools/gpu_check.sh)."""
    quiet_imports()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calm", default="tiny_calm")
    parser.add_argument("--baseline", default="tiny_baseline")
    parser.add_argument("--seq", type=int, default=256, help="context tokens per sequence")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed repeats (best of)")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    m = measure(args.calm, args.baseline, [], args.seq, args.batch, args.steps, breakdown=not args.no_breakdown)
    for kind in ("calm", "baseline"):
        print(f"{kind:9s} {m[kind]:14s} {m[f'{kind}_ms_per_step']:9.1f} ms/step {m[f'{kind}_tokens_per_s']:12.0f} "
              f"tokens/s")
        for part, ms in m.get(f"{kind}_breakdown_ms", {}).items():
            print(f"          {part:40s} {ms:9.1f} ms")
    print(f"CALM / baseline training throughput: {m['ratio']:.2f}x on {m['device']} "
          f"(FLOPs limit {m['flops_limit']:.2f}x: {m['ratio'] / m['flops_limit']:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
