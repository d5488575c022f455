"""KV-cached steps over the backbone's own weights in plain torch calls, for generation.

Why not megatron's static inference path: decoding one step at a time is bound by per-call
overhead, and megatron's layers are built for training and model parallelism. Every linear goes
through an autograd function and its process-group lookups, and the cache keeps keys *before*
rotation, so each step recomputes cos/sin and re-rotates every cached key in every layer (work
that grows with the context). Here a layer is a dozen torch calls on the same parameters: keys are
stored rotated, and the rotary table is computed once per cache.

It applies to one tensor-parallel rank holding the whole decoder with a layer spec whose norms
are modules of their own (sdpa, flash_attn, local); `Backbone.new_cache` falls back to megatron's
path otherwise (te's fused norm-linear layers, TP > 1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from calm_dist.models.attention import bottom_right_causal_mask


class PlainKVCache:
    """Rotated keys and values of past steps, [layers, batch, kv heads, max_steps, head_dim] each,
    allocated at the first step (on the inputs' device and dtype)."""

    def __init__(self, batch_size: int, max_steps: int):
        self.batch_size = batch_size
        self._max_steps = max_steps
        self._length = 0
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.cos_SD: Optional[torch.Tensor] = None  # the rotary table at every cached position
        self.sin_SD: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        """Steps already cached."""
        return self._length

    @property
    def max_steps(self) -> int:
        return self._max_steps

    def reset(self) -> None:
        """Forget all steps (the buffers are kept and overwritten)."""
        self._length = 0

    def advance(self, steps: int) -> None:
        self._length += steps

    def allocate_once(self, backbone, like: torch.Tensor) -> None:
        """The buffers and the rotary table at the first step (`like`: its inputs), again if the
        inputs' dtype or device has changed since (after `reset()`)."""
        if self.keys is not None and self.keys.dtype == like.dtype and self.keys.device == like.device:
            return
        cfg = backbone.config
        head_dim = cfg.kv_channels
        shape = (cfg.num_layers, self.batch_size, cfg.num_query_groups, self._max_steps, head_dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.values = torch.empty_like(self.keys)
        freqs_SD = backbone.rotary(self._max_steps).reshape(self._max_steps, -1)  # float32 angles
        # megatron's own rounding: cos/sin in float32, then cast to the activations' dtype.
        self.cos_SD = torch.cos(freqs_SD).to(device=like.device, dtype=like.dtype)
        self.sin_SD = torch.sin(freqs_SD).to(device=like.device, dtype=like.dtype)


def supports_plain_decode(backbone) -> bool:
    """Whether `plain_cached_forward` computes what megatron's layers compute for this backbone.
    `calm_dist.models.backbone.transformer_config` fixes the rest (full-width RoPE without
    scaling, dense MLPs, standard softmax, no sliding window); the checks below are the settings
    a config or a parallel layout can change."""
    cfg = backbone.config
    return (
        backbone.attention_backend != "te"  # te fuses the input norms into its linears
        and cfg.tensor_model_parallel_size == 1
        and cfg.context_parallel_size == 1
        and backbone.options.pre_process
        and backbone.options.post_process
        and len(backbone.decoder.layers) == cfg.num_layers  # one pipeline stage holds them all
        and not cfg.qk_layernorm
        and not cfg.add_bias_linear
        and not cfg.add_qkv_bias
        and not cfg.rotary_interleaved
        and not cfg.apply_residual_connection_post_layernorm
        and not cfg.fp32_residual_connection
        and not cfg.num_moe_experts
        and cfg.gated_linear_unit
        and cfg.activation_func is F.silu
    )


def _rotate(t_BSHD: torch.Tensor, cos_S1D: torch.Tensor, sin_S1D: torch.Tensor) -> torch.Tensor:
    """RoPE, non-interleaved halves (megatron's `_apply_rotary_pos_emb_bshd` without a pass-through)."""
    first, second = t_BSHD.chunk(2, dim=-1)
    return t_BSHD * cos_S1D + torch.cat((-second, first), dim=-1) * sin_S1D


def plain_cached_forward(backbone, x_BSD: torch.Tensor, cache: PlainKVCache) -> torch.Tensor:
    """The decoder on `x_BSD` (new steps after the cached ones), extending `cache`; equals the
    uncached forward's last steps."""
    cfg = backbone.config
    batch, steps, _ = x_BSD.shape
    if batch > cache.batch_size:
        raise ValueError(f"the KV cache was made for a batch of {cache.batch_size}, not {batch}: "
                         "make one with new_cache(batch_size)")
    cache.allocate_once(backbone, x_BSD)
    start, end = cache.length, cache.length + steps
    heads, groups, head_dim = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per_group = heads // groups
    scale = cfg.softmax_scale or head_dim**-0.5  # as the core attention modules default it
    cos_S1D, sin_S1D = cache.cos_SD[start:end, None], cache.sin_SD[start:end, None]
    # Query i sees every cached key and the new keys up to its own (bottom-right causal). A
    # prompt into an empty cache is plainly causal, which keeps SDPA's fused kernels on a GPU.
    mask_SK, is_causal = None, steps > 1 and start == 0
    if steps > 1 and start > 0:
        mask_SK = bottom_right_causal_mask(steps, end, x_BSD.device)
    h_BSD = x_BSD
    for index, layer in enumerate(backbone.decoder.layers):
        attention = layer.self_attention
        # megatron's fused projection: per key/value group, its query heads, then its key, then its value.
        qkv = F.linear(layer.input_layernorm(h_BSD), attention.linear_qkv.weight)
        qkv = qkv.view(batch, steps, groups, per_group + 2, head_dim)
        query_BSHD = _rotate(qkv[:, :, :, :per_group].reshape(batch, steps, heads, head_dim), cos_S1D, sin_S1D)
        key_BSGD = _rotate(qkv[:, :, :, per_group], cos_S1D, sin_S1D)
        keys_BGKD, values_BGKD = cache.keys[index, :batch], cache.values[index, :batch]  # rows in use
        keys_BGKD[:, :, start:end] = key_BSGD.transpose(1, 2)
        values_BGKD[:, :, start:end] = qkv[:, :, :, per_group + 1].transpose(1, 2)
        out_BHSD = F.scaled_dot_product_attention(
            query_BSHD.transpose(1, 2), keys_BGKD[:, :, :end], values_BGKD[:, :, :end],
            attn_mask=mask_SK, is_causal=is_causal, scale=scale, enable_gqa=groups < heads,
        )  # fmt: skip
        h_BSD = h_BSD + F.linear(out_BHSD.transpose(1, 2).reshape(batch, steps, -1), attention.linear_proj.weight)
        # The fused gate/up weight's halves are contiguous views; on a CPU two products on them
        # ran 8-20% faster than one on the whole weight at decode's few rows.
        fc1 = layer.mlp.linear_fc1.weight
        normed_BSD = layer.pre_mlp_layernorm(h_BSD)
        gate, up = F.linear(normed_BSD, fc1[: cfg.ffn_hidden_size]), F.linear(normed_BSD, fc1[cfg.ffn_hidden_size :])
        h_BSD = h_BSD + F.linear(F.silu(gate) * up, layer.mlp.linear_fc2.weight)
    cache.advance(steps)
    return backbone.decoder.final_layernorm(h_BSD)
