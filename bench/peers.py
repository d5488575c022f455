"""Peers: calm-dist's token baseline beside Hugging Face transformers' Llama, the same weights.

Users compare a training system with what they already run. The token baseline is a Llama
(RMSNorm, SwiGLU, RoPE, no biases, untied embeddings), so transformers' `LlamaForCausalLM` with
our weights (mapped by `calm_dist.checkpoint.reference_names.llama_causal_lm_rules`) computes the
same function. Measured, interleaved in one run:

- generation tokens/s, calm-dist (`calm_dist.generation.generate_baseline`: plain torch calls over
  the megatron-core layers' weights, its own KV cache; calm_dist/models/plain_decode.py) against
  `LlamaForCausalLM.generate` (its dynamic KV cache), greedy and sampled,
  batch 1 and 8, the same prompts and number of new tokens; greedy outputs must be identical
  (checked: a mismatch fails the benchmark);
- training tokens/s on 1 rank: calm-dist's DeepSpeed ZeRO-3 engine and its 3d engine
  (megatron-core, TP = PP = 1, started from the same weights), built as the trainer builds them,
  against a plain PyTorch loop (AdamW with the same settings, gradient clipping) around
  `LlamaForCausalLM`, the same initial weights and batches, steps interleaved in one process
  (bench/workers/peer_step_worker.py); the first losses must agree;
- host memory per rank while building a CALM-XL-shaped model for ZeRO-3, partitioned
  (zero.Init, the default) and whole, at 1, 2 and 4 ranks (bench/construction.py).

transformers is a benchmark-only dependency (requirements-bench.txt); nothing in calm_dist
imports it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import build_baseline, job_config, launch_worker, paired_ratio, time_rounds
from bench.construction import add_construction_figures
from bench.report import BenchResult, at_least

NAME = "peers"
PROMPT_TOKENS = 16
TARGET = 1.0  # calm-dist / transformers generation tokens/s
STEP_TARGET = 0.9  # calm-dist / plain loop training tokens/s: within 10%
# Measured training rounds (one step of each side in turn; paired_ratio). A tiny step takes a
# fraction of a second, so its rounds are cheap; 4 rounds of d768 take about 80 s. --quick: half.
STEPS = {"tiny": 16, "d768": 4}
STEP_WORKER = Path(__file__).resolve().parent / "workers" / "peer_step_worker.py"
# (name, preset, overrides): the tiny baseline, and in the full run a 12-layer d-768 one (GPT-2 small's shape).
CONFIGS = {
    "tiny": ("tiny_baseline", []),
    "d768": ("tiny_baseline", ["model.num_layers=12", "model.hidden_size=768", "model.intermediate_size=2048",
                               "model.num_attention_heads=12"]),
}


def llama_config(m):
    """transformers' `LlamaConfig` for our baseline's `ModelConfig` (the same function; sdpa attention)."""
    from transformers import LlamaConfig  # lazy: benchmark-only dependency

    from calm_dist.config.rules import query_groups

    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=query_groups(m), max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id, pad_token_id=m.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return config


def to_transformers(model):
    """`LlamaForCausalLM` holding `model`'s weights (fp32, eval), exactly mapped."""
    from transformers import LlamaForCausalLM  # lazy: benchmark-only dependency

    from calm_dist.checkpoint.reference_names import llama_causal_lm_rules, to_reference

    m = model.cfg
    config = llama_config(m)
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    weights = to_reference(llama_causal_lm_rules(m), ours, "the benchmark's baseline")
    peer = LlamaForCausalLM(config)
    missing, unexpected = peer.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"Llama weights do not match: missing {missing}, unexpected {unexpected}")
    return peer.eval()


def measure(ours, peer, batch: int, new_tokens: int, greedy: bool, repeats: int, device: str = "cpu",
            require_identical: bool = True) -> dict:
    """Both generators on the same prompts (on `device`). Greedy outputs must agree token for token
    when `require_identical` (fp32 on CPU); in bf16 on a GPU the two kernels' roundings may flip a
    near-tie, so there the agreement is reported instead (`greedy_agreement`: the share of rows
    identical)."""
    from calm_dist.generation import generate_baseline

    g = torch.Generator().manual_seed(batch)
    prompts_BT = torch.randint(1, ours.cfg.vocab_size - 1, (batch, PROMPT_TOKENS), generator=g).to(device)
    out = {}

    def run_ours():
        out["ours"] = generate_baseline(ours, prompts_BT.tolist(), new_tokens, greedy=greedy,
                                        generator=torch.Generator(device).manual_seed(0))

    def run_peer():
        out["peer"] = peer.generate(prompts_BT, attention_mask=torch.ones_like(prompts_BT), do_sample=not greedy,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_k=None, top_p=None,
                                    temperature=1.0, eos_token_id=None, pad_token_id=ours.cfg.pad_token_id)

    rounds = time_rounds({"ours": run_ours, "peer": run_peer}, repeats=repeats, warmup=1, device=device)
    seconds = {side: statistics.median(times) for side, times in rounds.items()}
    peer_tokens = out["peer"][:, PROMPT_TOKENS:].tolist()
    assert all(len(row) == new_tokens for row in out["ours"].tokens + peer_tokens)
    same_rows = [a == b for a, b in zip(out["ours"].tokens, peer_tokens)]
    if greedy and require_identical and not all(same_rows):
        raise AssertionError(f"greedy outputs differ (batch {batch}, row {same_rows.index(False)}): the weights or "
                             "the model differ")
    tokens = batch * new_tokens
    return {"batch": batch, "greedy": greedy, "new_tokens": new_tokens, "device": str(device),
            "ours_tokens_per_s": tokens / seconds["ours"], "transformers_tokens_per_s": tokens / seconds["peer"],
            "ratio": paired_ratio(rounds["peer"], rounds["ours"]), "rounds": repeats,
            "greedy_identical": all(same_rows) if greedy else None,
            "greedy_agreement": sum(same_rows) / batch if greedy else None,
            "greedy_common_prefix": _mean_common_prefix(out["ours"].tokens, peer_tokens) if greedy else None}


def _mean_common_prefix(rows_a, rows_b) -> float:
    """Mean number of leading tokens two generators agree on, per row (where a near-tie first flips)."""
    lengths = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(rows_a, rows_b)]
    return sum(lengths) / len(lengths)


def run(quick: bool = False, configs: list[str] | None = None, new_tokens: int | None = None,
        repeats: int | None = None, training_steps: int | None = None, construction: bool = True) -> BenchResult:
    """Generation figures for each config, then its training step (`training_steps` 0: none), then
    the construction memory under ZeRO-3 (bench/construction.py)."""
    start = time.perf_counter()
    result = BenchResult(NAME)
    names = configs or (["tiny"] if quick else ["tiny", "d768"])
    with torch.no_grad():
        import transformers  # lazy: benchmark-only dependency

        result.details["transformers"] = transformers.__version__
        for name in names:
            preset, overrides = CONFIGS[name]
            ours = build_baseline(job_config(preset, overrides)).eval()
            peer = to_transformers(ours)
            for batch in (1, 8):
                for greedy in (True, False):
                    m = measure(ours, peer, batch, new_tokens or (32 if quick else 64), greedy,
                                repeats or (2 if quick else 5))
                    mode = "greedy" if greedy else "sampled"
                    result.details[f"{name} b{batch} {mode}"] = m
                    note = (f"{m['ours_tokens_per_s']:,.0f} vs {m['transformers_tokens_per_s']:,.0f} tokens/s"
                            + ("; outputs identical" if greedy else ""))
                    result.add(f"{name}: generation, batch {batch}, {mode}: calm-dist / transformers tokens/s",
                               m["ratio"], "x", f">= {TARGET:g}x", at_least(m["ratio"], TARGET), note)
            del ours, peer
    for name in names if training_steps != 0 else []:
        steps = (STEPS[name] // 2 if quick else STEPS[name]) if training_steps is None else training_steps
        training_step(result, name, steps=steps)
    if construction:
        add_construction_figures(result, quick)
    result.seconds = time.perf_counter() - start
    return result


def training_step(result: BenchResult, name: str, steps: int, overrides: tuple[str, ...] = ()) -> None:
    """calm-dist's ZeRO-3 and 3d steps (1 rank) against the plain transformers loop, in one worker
    process; the first losses must agree."""
    preset, config_overrides = CONFIGS[name]
    args = ["--preset", preset, "--steps", str(steps)]
    for override in [*config_overrides, "training.micro_batch_size=4", *overrides]:
        args += ["--override", override]
    with tempfile.TemporaryDirectory(prefix="calm-bench-peers-") as tmp:
        launch_worker(STEP_WORKER, 1, Path(tmp), args, timeout=900)
        record = json.loads((Path(tmp) / "steps.json").read_text())
    losses = record["first_losses"]
    for side in ("ours", "3d"):
        if abs(losses[side] - losses["peer"]) > 1e-4 * abs(losses["peer"]):
            raise AssertionError(f"first training losses differ: calm-dist ({side}) {losses[side]}, "
                                 f"transformers {losses['peer']}")
    seconds = record["step_seconds"]
    typical = {side: statistics.median(times) for side, times in seconds.items()}
    tokens = record["tokens_per_step"]
    ratios = {side: paired_ratio(seconds["peer"], seconds[side]) for side in ("ours", "3d")}
    fastest = {side: min(seconds["peer"]) / min(seconds[side]) for side in ("ours", "3d")}
    result.details[f"{name} training step"] = {**record, "ratio": ratios["ours"], "ratio_3d": ratios["3d"],
                                               "ratio_of_fastest": fastest["ours"], "ratio_3d_of_fastest": fastest["3d"]}
    for side, engine in (("ours", "ZeRO-3"), ("3d", "3d (megatron-core)")):
        result.add(f"{name}: training step (batch {record['batch']} x {record['seq_length']}), {engine} 1 rank / "
                   "plain transformers loop, tokens/s", ratios[side], "x", f">= {STEP_TARGET:g}x",
                   at_least(ratios[side], STEP_TARGET),
                   f"median {tokens / typical[side]:,.0f} vs {tokens / typical['peer']:,.0f} tokens/s over "
                   f"{len(seconds[side])} rounds (fastest steps: {fastest[side]:.3f}x); first losses "
                   f"{losses[side]:.5f} and {losses['peer']:.5f}")
