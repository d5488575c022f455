"""Model FLOPs per token for CALM, the token baseline and the autoencoder, and device peaks for MFU.

The formula is stated here so that MFU numbers can be compared. It follows
CALM.md §5.3 and reproduces the paper's Table 1 (tests/test_flops.py): inference within 3.4% for
all six models, training within 3.1% except CALM-XL (+8.6%, a discrepancy that no choice of
prefactors removes; see the test).

Symbols: d hidden size, n_layer layers, V vocabulary, K tokens per chunk, ctx context in model
steps (chunks for CALM, tokens for the baseline), P_bb backbone non-embedding parameters
(attention, MLP, norms), P_in input compressor, P_head energy head, P_c its hidden-state
projection (d^2 + 3d: Linear and LayerNorm), N head samples per position (model.num_samples),
T samples at inference, d_AE / ffn_AE / l autoencoder hidden size, FFN width and latent size.

One multiply-add is 2 FLOPs, so a dense layer costs 2 x its parameters per row it is applied to.
Attention scores and their weighted sum cost 4 * n_layer * ctx * d per step: every step is counted
against the full context (no discount for the causal mask), as the paper does, as the PaLM MFU
convention does (6N + 12 * n_layer * d * ctx per token in training) and as torch's FlopCounterMode
counts attention kernels. Embedding lookups, elementwise work (norms, activations, softmax), the
loss and the optimizer count as 0.

    backbone(ctx)  = 2 P_bb + 4 n_layer ctx d                               forward, per step
    head(n)        = 2 P_c + n * 2 (P_head - P_c)                           forward, n samples
    baseline       = backbone(ctx) + 2 V d                                  forward, per token
    CALM inference = [backbone(ctx) + 2 P_in + head(T) + T * AE_dec] / K    per token, T = 1
    CALM training  = [3 (backbone(ctx) + 2 P_in + head(N)) + AE_enc] / K    per token
    AE training    = 3 (AE_enc + AE_dec) / K                                per token

Choices, made explicit:
- Training = 3 x forward (the backward pass costs twice the forward) for everything trained:
  backbone, compressor and head. (The head's noise projection needs no input gradient, so this
  overcounts by 2 noise_size d per sample: under 0.1% at the paper's sizes.)
- The head runs once per sample, except its hidden-state projection, which EnergyHead computes
  once per position and shares across samples. (The reference repeats h N times; counting P_c
  N times instead would add 1-2% to CALM's training FLOPs.)
- The frozen autoencoder's encoder runs forward only (no backward), once per target chunk, to give
  the target posterior. Drawing the M target samples and the energy distances (about
  3 N M l elementwise FLOPs per step, under 0.1%) are not matmuls and are left out.
- Inference uses T = 1 head sample and one AE decode per step, as Table 1 does. The batch
  temperature sampler (CALM.md §4.2) runs the head and the decoder T = n times per step: pass
  num_samples=n.
- The autoencoder terms are counted from its structure, not as 2 x its parameters: its per-token
  layers run K times per chunk and its vocabulary projection reuses the tied embedding:
      AE_enc = 2 [K enc_pre 3 d_AE ffn_AE + K d_AE^2 + enc_post 3 d_AE ffn_AE + 2 l d_AE]
      AE_dec = 2 [l d_AE + dec_pre 3 d_AE ffn_AE + K d_AE^2 + K dec_post 3 d_AE ffn_AE]
               + 2 d_AE V K                                               (vocabulary projection)
  (enc_pre / enc_post: encoder layers before / after the squeeze; likewise around the expand.)
- FLOPs depend on the vocabulary (CALM.md §9.13): the decoder's projection costs d_AE V
  multiply-adds per token, against d V for the baseline's output layer; it is ~46% of CALM-M's
  inference FLOPs. With d_AE >= d and a large V, a CALM can cost MORE per token than a baseline of
  the same backbone; its speed-up then comes from K times fewer sequential steps.

These are model FLOPs (for MFU), not hardware FLOPs: activation recomputation is not counted, and
FlashAttention skipping fully masked blocks does not reduce them.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Optional

from calm_dist.config.rules import ae_intermediate_size, head_blocks
from calm_dist.config.schema import AutoencoderConfig, JobConfig, ModelConfig
from calm_dist.models.param_counts import backbone_param_count, compressor_param_count, energy_head_param_count

logger = logging.getLogger(__name__)


# ---- building blocks (forward FLOPs) -------------------------------------------------------------


def backbone_forward_flops(model_cfg: ModelConfig, context_steps: int) -> float:
    """One step through the backbone: 2 * P_bb + 4 * n_layer * ctx * d."""
    d = model_cfg.hidden_size
    return 2.0 * backbone_param_count(model_cfg) + 4.0 * model_cfg.num_layers * context_steps * d


def compressor_forward_flops(model_cfg: ModelConfig) -> float:
    """One chunk through the input compressor: 2 * P_in."""
    return 2.0 * compressor_param_count(model_cfg.hidden_size, model_cfg.patch_size)


def energy_head_forward_flops(model_cfg: ModelConfig, num_samples: int) -> float:
    """`num_samples` samples of the energy head at one position: the hidden-state projection
    (and its norm) runs once per position and is shared by the samples (EnergyHead.forward);
    everything else runs once per sample."""
    d = model_cfg.hidden_size
    total = energy_head_param_count(d, model_cfg.latent_size, model_cfg.noise_size, head_blocks(model_cfg))
    shared = d * d + d + 2 * d  # hidden_proj (weight, bias) + hidden_norm (LayerNorm weight, bias)
    return 2.0 * shared + num_samples * 2.0 * (total - shared)


def _ae_shape(ae_cfg: AutoencoderConfig, vocab_size: int = 0) -> tuple[int, int, int, int, int]:
    """(d_AE, ffn_AE, l, K, V) with the 'derived' defaults resolved as validate() does."""
    vocab = ae_cfg.vocab_size or vocab_size
    if vocab <= 0:
        raise ValueError("autoencoder.vocab_size is 0 (= model.vocab_size): pass a validated config")
    ffn = ae_intermediate_size(ae_cfg)
    return ae_cfg.hidden_size, ffn, ae_cfg.latent_size, ae_cfg.patch_size, vocab


def ae_encoder_forward_flops(ae_cfg: AutoencoderConfig, vocab_size: int = 0) -> float:
    """One chunk through the encoder, to (mu, log_sigma)."""
    d, ffn, latent, k, _ = _ae_shape(ae_cfg, vocab_size)
    pre = ae_cfg.num_encoder_layers // 2  # per-token layers, before the squeeze (run K times)
    post = ae_cfg.num_encoder_layers - pre
    layer = 3 * d * ffn  # SwiGLU: gate, up, down
    return 2.0 * (k * pre * layer + k * d * d + post * layer + d * 2 * latent)


def ae_decoder_forward_flops(ae_cfg: AutoencoderConfig, vocab_size: int = 0) -> float:
    """One latent through the decoder to K x V logits, including the vocabulary projection."""
    d, ffn, latent, k, v = _ae_shape(ae_cfg, vocab_size)
    pre = ae_cfg.num_decoder_layers // 2
    post = ae_cfg.num_decoder_layers - pre  # per-token layers, after the expand (run K times)
    layer = 3 * d * ffn
    return 2.0 * (latent * d + pre * layer + d * k * d + k * post * layer) + 2.0 * d * v * k


# ---- per-token totals -----------------------------------------------------------------------------


def calm_flops_per_token(
    model_cfg: ModelConfig,
    ae_cfg: AutoencoderConfig,
    context_steps: int,
    training: bool,
    num_samples: Optional[int] = None,
) -> float:
    """CALM FLOPs per token (per step / K). `context_steps` is the attention context in chunks.

    Training: 3 x (backbone + compressor + head with N samples) + the frozen encoder's forward,
    N = `num_samples` or model.num_samples. Inference: forward only, with T = `num_samples` or 1
    head samples and as many AE decodes (Table 1 uses T = 1)."""
    k = model_cfg.patch_size
    trunk = backbone_forward_flops(model_cfg, context_steps) + compressor_forward_flops(model_cfg)
    if training:
        n = model_cfg.num_samples if num_samples is None else num_samples
        head = energy_head_forward_flops(model_cfg, n)
        per_step = 3 * (trunk + head) + ae_encoder_forward_flops(ae_cfg, model_cfg.vocab_size)
    else:
        t = 1 if num_samples is None else num_samples
        head = energy_head_forward_flops(model_cfg, t)
        per_step = trunk + head + t * ae_decoder_forward_flops(ae_cfg, model_cfg.vocab_size)
    return per_step / k


def baseline_flops_per_token(model_cfg: ModelConfig, context_tokens: int, training: bool) -> float:
    """Token baseline: 2 * (P_bb + V * d) + 4 * n_layer * ctx * d per token; x 3 for training."""
    output_layer = 2.0 * model_cfg.vocab_size * model_cfg.hidden_size
    forward = backbone_forward_flops(model_cfg, context_tokens) + output_layer
    return 3 * forward if training else forward


def autoencoder_flops_per_token(ae_cfg: AutoencoderConfig, training: bool) -> float:
    """Stage-1 autoencoder: encoder + decoder (with its vocabulary projection) per chunk / K;
    x 3 for training. `ae_cfg` must be validated (vocab_size resolved)."""
    forward = ae_encoder_forward_flops(ae_cfg) + ae_decoder_forward_flops(ae_cfg)
    return (3 * forward if training else forward) / ae_cfg.patch_size


def training_flops_per_token(job_cfg: JobConfig) -> float:
    """Training FLOPs per token read, for the configured stage; the context is the number of model
    steps the transformer reads per block (data.seq_length, / K for CALM)."""
    stage, model = job_cfg.training.stage, job_cfg.model
    if stage == "autoencoder":
        return autoencoder_flops_per_token(job_cfg.autoencoder, training=True)
    seq = job_cfg.data.seq_length
    if stage == "baseline":
        steps = job_cfg.derived.steps_per_block if job_cfg.derived else seq
        return baseline_flops_per_token(model, steps, training=True)
    steps = job_cfg.derived.steps_per_block if job_cfg.derived else seq // model.patch_size
    return calm_flops_per_token(model, job_cfg.autoencoder, steps, training=True)


# ---- throughput and MFU ----------------------------------------------------------------------------


def achieved_tflops(flops_per_token: float, tokens_per_sec_per_device: float) -> float:
    """Model TFLOP/s per device."""
    return flops_per_token * tokens_per_sec_per_device / 1e12


def mfu_percent(
    flops_per_token: float, tokens_per_sec_per_device: float, peak: Optional[float]
) -> Optional[float]:
    """Model FLOPs utilisation in % (PaLM appendix B): achieved / peak; None when the peak is unknown."""
    if not peak:
        return None
    return 100.0 * achieved_tflops(flops_per_token, tokens_per_sec_per_device) / peak


# Dense peak TFLOP/s of one device (no 2:4 sparsity), from the vendors' product data sheets (NVIDIA
# H100/H200/GH200/B200/A100/L40S/L40/L4/A40/A10/RTX 4090/V100, AMD Instinct MI300X/MI250X): where a sheet
# quotes tensor-core numbers "with sparsity", the dense value is half of that. "fp32" is the plain
# (non-tensor-core) rate; "tf32" the tensor-core rate that fp32 matmuls get only with TF32 enabled.
# A key matches torch.cuda.get_device_name() when its words appear there as whole words, in order
# ("NVIDIA H100 80GB HBM3" -> "H100"; "NVIDIA A10G" is not "A10"); the longest matching key wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # Hopper in GH200
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # H200 SXM
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # H100 SXM5 ("H100 80GB HBM3")
    "H800": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe alike
    "A800": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A40": {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},  # fp32 accumulate
    "V100": {"fp16": 125.0, "fp32": 15.7},  # no bf16 or tf32 tensor cores
    "MI300X": {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4},
    "MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 95.7},
}


def compute_precision(training_precision: str) -> str:
    """The precision the matmuls actually run in: bf16, or for fp32 training tf32 when torch has
    TF32 matmuls enabled (`torch.set_float32_matmul_precision("high")`) and plain fp32 otherwise."""
    if training_precision != "fp32":
        return training_precision
    import torch  # lazy: ~1 s; calm-sweep and calm-config read the formulas above without torch

    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", text.upper())


def _table_entry(device_name: str) -> Optional[dict[str, float]]:
    name = _words(device_name)
    for key in sorted(PEAK_TFLOPS, key=lambda k: -len(_words(k))):  # "H100 PCIe" before "H100"
        key_words = _words(key)
        n = len(key_words)
        if any(name[i : i + n] == key_words for i in range(len(name) - n + 1)):
            return PEAK_TFLOPS[key]
    return None


@functools.lru_cache(maxsize=None)  # pure apart from the note: caching makes the note one-time
def peak_tflops(device_name: str, precision: str, override: float = 0.0) -> Optional[float]:
    """Dense peak TFLOP/s of one device at `precision` (bf16, fp16, tf32, fp32).

    `override` (logging.peak_tflops) wins when > 0. Returns None on CPU or for a device/precision
    the table does not know; MFU is then not reported, and a note (once) says how to set it."""
    if override > 0:
        return float(override)
    peaks = _table_entry(device_name) if device_name.lower() not in ("", "cpu") else None
    peak = peaks.get(precision) if peaks else None
    if peak is None:
        where = "a CPU" if device_name.lower() in ("", "cpu") else f"{device_name!r} at {precision}"
        logger.info(  # a note for the job (rank 0 logs INFO), not a warning on every rank
            "MFU not reported: no peak TFLOP/s known for %s. Set logging.peak_tflops=<dense peak "
            "TFLOP/s of one device at this precision> to report it.", where,
        )
    return peak
