"""Defaults and block arithmetic, stated once. Validation resolves the defaults into the config's
fields with these rules; models, FLOPs, memory estimates, data loading, evaluation and conversion
read them from here (or from a validated config) instead of restating them.

A language-model block holds the context plus one target step (CALM.md §9.7): K more tokens for
CALM, one for the baseline. The autoencoder has no target step: it reads its block as chunks.
"""

from __future__ import annotations

from calm_dist.config.schema import AutoencoderConfig, ModelConfig

PACKING_FOR_TRAINING = {"autoencoder": "ae", "calm": "lm", "baseline": "lm"}  # the reference's (§1.3, §2.6)
PACKING_FOR_EVALUATION = {"autoencoder": "ae", "calm": "eval", "baseline": "eval"}  # whole documents (§9.7)


def head_blocks(m: ModelConfig) -> int:
    """Energy-head depth: model.num_mlp_layers, or num_layers / 4 as in the paper."""
    return m.num_mlp_layers or max(1, m.num_layers // 4)


def query_groups(m: ModelConfig) -> int:
    """Key/value head groups: model.num_query_groups, or one per head (multi-head attention)."""
    return m.num_query_groups or m.num_attention_heads


def ae_intermediate_size(ae: AutoencoderConfig) -> int:
    """The autoencoder's FFN width: autoencoder.intermediate_size, or 2.5 x its hidden size."""
    return ae.intermediate_size or int(2.5 * ae.hidden_size)


def stack_width(cfg) -> int:
    """The hidden size of the stage's main stack (DeepSpeed's bucket sizes follow it): the
    autoencoder's for stage 1, the backbone's otherwise. Stated here so that the DeepSpeed config
    is built before any model code (megatron) is imported."""
    return cfg.autoencoder.hidden_size if cfg.training.stage == "autoencoder" else cfg.model.hidden_size


def target_tokens(stage: str, patch_size: int) -> int:
    """Tokens of the one target step after the context."""
    return {"baseline": 1, "calm": patch_size, "autoencoder": 0}[stage]


def steps_per_block(stage: str, seq_length: int, patch_size: int) -> int:
    """Model steps the transformer reads per block: tokens for the baseline, chunks otherwise."""
    return seq_length if stage == "baseline" else seq_length // patch_size


def context_tokens(stage: str, context_steps: int, patch_size: int) -> int:
    """Tokens in a context of `context_steps` model steps (the inverse of `steps_per_block`)."""
    return context_steps if stage == "baseline" else context_steps * patch_size


def block_tokens(stage: str, seq_length: int, patch_size: int) -> int:
    """Tokens per block: a context of seq_length tokens plus the target step."""
    return seq_length + target_tokens(stage, patch_size)
