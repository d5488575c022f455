"""Per-GPU training memory of a config's parallel layout, by arithmetic (`calm-config --memory`).

Model states, bytes per trainable parameter:
- zero3: 16 (weights 2 + grads 2 + fp32 master 4 + Adam 8 in bf16; 4 + 4 + 8 in fp32), all of it
  partitioned over every rank;
- 3d: fp32 weights 4 + grads 4 on the ranks holding the parameter (a stage's layers are split over
  its TP ranks; its embeddings, compressor and head are replicated over them), Adam's 8 divided
  over the data-parallel replicas by ZeRO-1 (not divided with zero_stage 0). The input embedding
  and the baseline's output layer are split over TP by vocabulary (calm_dist.parallel.vocab_parallel).

Activations kept for the backward pass, per sequence, from the saved tensors of our own layers
(fp32, measured on a 1-layer model with the paper's FFN ratio; tests/test_parallel_3d.py
re-measures them): a backbone layer keeps `LAYER_BYTES` x steps x hidden (attention through
sdpa/flash keeps nothing quadratic in the steps); each energy-head block keeps `HEAD_BLOCK_BYTES`
x N x steps x hidden and the head's input side `HEAD_INPUT_BYTES` x N x steps x hidden (the N
samples are N copies). bf16 keeps about half. Full recomputation keeps one layer input (4 bytes
x steps x hidden) per layer plus one layer's activations while it recomputes. Not counted: the
energy loss's chunks, the frozen autoencoder's fp32 weights (last stage), temporary buffers and
fragmentation (leave 10-20% headroom); with virtual pipeline stages the interleaved schedule keeps
somewhat more in flight than the PP micro-batches counted here.
"""

from __future__ import annotations

from dataclasses import dataclass

from calm_dist.config.rules import head_blocks
from calm_dist.config.schema import JobConfig
from calm_dist.models.param_counts import backbone_param_count, compressor_param_count, energy_head_param_count

LAYER_BYTES = 95.1  # per step x hidden, fp32, FFN = 2.6875 x hidden
HEAD_BLOCK_BYTES = 44.0  # per sample x step x hidden, fp32
HEAD_INPUT_BYTES = 22.1  # per sample x step x hidden, fp32 (noise projection, norms, output)
GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    params_per_gpu: float  # trainable parameters on the fullest GPU
    states_gb: float  # weights, gradients and optimizer state on that GPU
    activations_gb: float  # kept for backward on the fullest stage (in-flight micro-batches included)
    in_flight: int  # micro-batches whose activations a first pipeline stage holds at once

    @property
    def total_gb(self) -> float:
        return self.states_gb + self.activations_gb


def _stage_params(cfg: JobConfig) -> tuple[float, float]:
    """Trainable parameters per GPU on the first and on the last pipeline stage."""
    m, par = cfg.model, cfg.parallel
    d = m.hidden_size
    # a stage's share of the layers (the final norm's d weights are negligible), split over TP
    layers = (backbone_param_count(m) - d) / par.pipeline_parallel / par.tensor_parallel
    embed = m.vocab_size * d
    embed /= par.tensor_parallel  # split by vocabulary (calm_dist.parallel.vocab_parallel)
    if cfg.training.stage == "calm":
        first = embed + compressor_param_count(d, m.patch_size)
        last = energy_head_param_count(d, m.latent_size, m.noise_size, head_blocks(m)) + d
    else:
        first, last = embed, embed + d  # the untied output layer, split by vocabulary too
    if par.pipeline_parallel == 1:
        return first + last + layers, first + last + layers
    return first + layers, last + layers


def estimate_memory(cfg: JobConfig) -> MemoryEstimate:
    """For a validated config (its world size in `cfg.derived`)."""
    m, par, tr, d = cfg.model, cfg.parallel, cfg.training, cfg.derived
    first, last = _stage_params(cfg)
    worst = max(first, last)
    if par.regime == "zero3":
        states = 16 * worst / d.world_size
    else:
        adam = 8 / d.data_parallel_size if par.zero_stage == 1 else 8
        states = worst * (8 + adam)

    scale = 0.5 if tr.precision == "bf16" else 1.0
    steps, h, batch = d.steps_per_block, m.hidden_size, tr.micro_batch_size
    layers = m.num_layers / par.pipeline_parallel
    if par.activation_recompute == "full":
        per_layer = 4 * steps * h * batch
        stage_layers = layers * per_layer + LAYER_BYTES * scale * steps * h * batch / par.tensor_parallel
    else:
        stage_layers = layers * LAYER_BYTES * scale * steps * h * batch / par.tensor_parallel
    head = 0.0
    if tr.stage == "calm":
        head = (HEAD_BLOCK_BYTES * head_blocks(m) + HEAD_INPUT_BYTES) * scale * m.num_samples * steps * h * batch
    in_flight = min(par.pipeline_parallel, d.gradient_accumulation_steps) if par.regime == "3d" else 1
    if par.pipeline_parallel == 1:
        activations = stage_layers + head
    else:
        activations = max(stage_layers * in_flight, stage_layers + head)
    return MemoryEstimate(worst, states / GB, activations / GB, in_flight)


def describe(cfg: JobConfig) -> str:
    """A few lines for people: the layout, then the estimate."""
    est, par, d = estimate_memory(cfg), cfg.parallel, cfg.derived
    return (
        f"layout: regime {par.regime}, world {d.world_size} = TP {par.tensor_parallel} x PP "
        f"{par.pipeline_parallel} x DP {d.data_parallel_size}; micro-batch {cfg.training.micro_batch_size}, "
        f"accumulation {d.gradient_accumulation_steps}, recompute {par.activation_recompute}, "
        f"{cfg.training.precision}\n"
        f"trainable parameters on the fullest GPU: {est.params_per_gpu / 1e6:,.0f}M\n"
        f"model states (weights, grads, optimizer): {est.states_gb:6.1f} GB\n"
        f"activations ({est.in_flight} micro-batch(es) in flight): {est.activations_gb:6.1f} GB\n"
        f"total per GPU (before buffers and fragmentation): {est.total_gb:6.1f} GB\n"
    )
