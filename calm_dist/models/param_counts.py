"""Parameter counts of the models, in closed form (checked against the built modules in the
tests). Pure arithmetic on the config: the FLOPs and memory formulas, `calm-config --memory` and
`calm-sweep plan` use them without importing torch's modules or megatron-core."""

from __future__ import annotations

from calm_dist.config.rules import head_blocks, query_groups
from calm_dist.config.schema import AutoencoderConfig, ModelConfig


def backbone_param_count(cfg: ModelConfig) -> int:
    """Parameters of the backbone, by formula: per layer QKV + output projection, SwiGLU MLP
    (three d x ffn matrices) and two RMSNorm weights; plus the final RMSNorm."""
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    kv_size = query_groups(cfg) * (d // cfg.num_attention_heads)
    attention = d * (d + 2 * kv_size) + d * d
    return cfg.num_layers * (attention + 3 * d * ffn + 2 * d) + d


def compressor_param_count(d: int, k: int) -> int:
    return (k * d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d


def energy_head_param_count(d: int, latent: int, noise: int, blocks: int) -> int:
    block = 2 * d + (2 * d * d + d) + (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d)
    return (noise * d + d) + 2 * d + (d * d + d) + 2 * d + blocks * block + 2 * d + (d * d + d) + (d * latent + latent)


def calm_param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of CALM, without the frozen autoencoder (the convention that matches
    the paper's Table 1; CALM.md §2.3)."""
    d = cfg.hidden_size
    return (
        cfg.vocab_size * d
        + backbone_param_count(cfg)
        + compressor_param_count(d, cfg.patch_size)
        + energy_head_param_count(d, cfg.latent_size, cfg.noise_size, head_blocks(cfg))
    )


def baseline_param_count(cfg: ModelConfig) -> int:
    """Input embedding + backbone + untied output layer."""
    return 2 * cfg.vocab_size * cfg.hidden_size + backbone_param_count(cfg)


def autoencoder_param_count(cfg: AutoencoderConfig) -> int:
    """Closed-form parameter count (CALM.md §1.1: 75.8M at the reference shapes, V = 128,257)."""
    d, k, l, ffn = cfg.hidden_size, cfg.patch_size, cfg.latent_size, cfg.intermediate_size
    layer = 3 * d * ffn + d
    layers = (cfg.num_encoder_layers + cfg.num_decoder_layers) * layer
    return (
        cfg.vocab_size * d
        + layers
        + (k * d * d + d)  # squeeze K*D -> D
        + (d * k * d + k * d)  # expand D -> K*D
        + (d * 2 * l + 2 * l)  # latent head
        + (l * d + d)  # decoder input
        + 2 * d  # final norms
    )
