"""The Llama-style decoder shared by CALM and the token baseline (CALM.md §2.3).

RMSNorm, SwiGLU MLP, RoPE over step positions (chunks for CALM, tokens for the baseline), no
biases, MHA or GQA, built from megatron-core's `TransformerBlock`. Input embeddings in, hidden
states after the final RMSNorm out (CALM.md §9.6); embedding tables and output heads belong to
the models that use it. It knows nothing of distribution: megatron's parallel state must exist
before it is built (`calm_dist.parallel.state.ensure_model_parallel` outside a launched job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import init_method_normal

from calm_dist.config.rules import query_groups
from calm_dist.config.schema import ModelConfig
from calm_dist.models.attention import CORE_ATTENTION, resolve_attention_backend
from calm_dist.models.plain_decode import PlainKVCache, plain_cached_forward, supports_plain_decode
from calm_dist.models.rope import RopeTable


@dataclass(frozen=True)
class BackboneOptions:
    """How the decoder is built, chosen from outside (the trainer's parallel set-up); the defaults
    are the whole decoder in one module with every activation kept."""

    pre_process: bool = True  # holds the first layers: reads forward()'s input (else set_input_tensor's)
    post_process: bool = True  # holds the last layers and the final norm
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation
    sequence_parallel: bool = False  # activations between TP regions split along the sequence
    vp_stage: Optional[int] = None  # which model chunk of its pipeline rank (interleaved schedule)
    # Where the model will run ("cpu", "cuda"), which decides the attention backend; None: a CUDA
    # GPU when there is one. A model evaluated on the CPU of a GPU node must not get a GPU-only one.
    device_type: Optional[str] = None


def _num_query_groups(cfg: ModelConfig) -> int:
    return query_groups(cfg)  # 0 means multi-head attention


def _recompute_settings(recompute: str) -> dict:
    """megatron's recompute fields: full recomputes every layer from its input (one layer per
    unit); selective only the core attention, whose activations grow with the sequence squared."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute != "none":
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    return {}


def transformer_config(
    cfg: ModelConfig, params_dtype: torch.dtype, options: BackboneOptions = BackboneOptions()
) -> TransformerConfig:
    """megatron's TransformerConfig for this backbone; tensor/pipeline sizes from parallel state."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    init = init_method_normal(cfg.init_std)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=_num_query_groups(cfg),
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(x W_gate) * (x W_up)
        activation_func=F.silu,
        add_bias_linear=False,
        # CALM.md §9.2: every Linear N(0, std), output projections too (megatron would scale
        # them by 1/sqrt(2 * num_layers) unless told otherwise).
        init_method=init,
        output_layer_init_method=init,
        init_method_std=cfg.init_std,
        perform_initialization=True,
        # megatron puts its weights on the current GPU unless told to build on the CPU; follow the
        # caller's device instead, so that the torch norms and the linears are built together.
        use_cpu_initialization=torch.get_default_device().type != "cuda",
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # the default "full" only warns that it is deprecated
        sequence_parallel=options.sequence_parallel,
        **_recompute_settings(options.recompute),
    )


def _no_norm(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


def _no_cross_attention(hidden_states: torch.Tensor, **unused) -> torch.Tensor:
    return hidden_states


def _no_cross_attention_bda(training: bool, fused: bool):
    return lambda hidden_states, residual, dropout_prob: hidden_states  # nothing was added to the stream


class PositionalInputLayer(TransformerLayer):
    """megatron's layer, handed its input positionally. megatron's block calls its layers with
    keyword arguments only, and torch's full backward hook on a module sees positional inputs only:
    with none, it runs as soon as the gradient reaches the layer's output, before any gradient
    inside the layer exists. ZeRO-3 reduces a whole layer's gradients from that hook
    (`parallel.zero3_gather=layer`). The same computation and state dict."""

    def __call__(self, *args, **kwargs):
        if not args and "hidden_states" in kwargs:
            args = (kwargs.pop("hidden_states"),)
        return super().__call__(*args, **kwargs)


def layer_spec(backend: str) -> ModuleSpec:
    """megatron's GPT layer spec with `backend` as core attention.

    The slots this decoder leaves empty (query/key norms, cross-attention with its norm and
    residual add) are left out or filled by plain functions instead of megatron's IdentityOp
    modules: the same computation, but ZeRO-3 puts its gather, release and backward hooks on every
    module a forward calls, parameters or not. That was 20 of the tiny model's 62 hooked modules.
    (megatron's CUDA graphs would want modules in these slots: `transformer_config` keeps them off.)"""
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec()
        spec.module = PositionalInputLayer
        return spec
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")  # a fresh spec: safe to edit
    spec.module = PositionalInputLayer
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = CORE_ATTENTION[backend]
    attention.q_layernorm = attention.k_layernorm = None  # megatron skips a None norm
    spec.submodules.pre_cross_attn_layernorm = _no_norm
    spec.submodules.cross_attention = _no_cross_attention
    spec.submodules.cross_attn_bda = _no_cross_attention_bda
    return spec


class KVCache:
    """Keys and values of past steps through megatron's own layers, for the backbones the plain
    path (calm_dist/models/plain_decode.py) does not cover: te layers, tensor parallelism.

    It wraps megatron's `StaticInferenceContext`, which megatron's `Attention` fills for every
    layer whatever the core attention, keeping RoPE right: it stores keys before rotation and
    rotates queries at positions [offset, offset + steps) and all cached keys from the full
    table, so positions continue from the cache length. `Backbone.forward` advances the offset.
    """

    def __init__(self, batch_size: int, max_steps: int):
        self.context = StaticInferenceContext(max_batch_size=batch_size, max_sequence_length=max_steps)

    @property
    def length(self) -> int:
        """Steps already cached."""
        return self.context.sequence_len_offset

    @property
    def max_steps(self) -> int:
        return self.context.max_sequence_length

    def reset(self) -> None:
        """Forget all steps (the buffers are kept and overwritten)."""
        self.context.reset()


class Backbone(torch.nn.Module):
    """Causal decoder: x [batch, steps, hidden] -> h [batch, steps, hidden] after the final norm.

    With `options.pre_process` / `post_process` off it holds a middle part of the layers (megatron
    picks which from the pipeline rank): a pipeline stage drives it through `set_input_tensor` and
    `forward_sequence_first`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        attention_backend: Optional[str] = None,
        params_dtype: torch.dtype = torch.float32,
        options: BackboneOptions = BackboneOptions(),
    ):
        super().__init__()
        device = torch.device(options.device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = cfg
        self.options = options
        self.attention_backend = resolve_attention_backend(
            attention_backend or cfg.attention_backend, device, params_dtype
        )
        self.config = transformer_config(cfg, params_dtype, options)
        self.decoder = TransformerBlock(
            self.config,
            layer_spec(self.attention_backend),
            pre_process=options.pre_process,
            post_process=options.post_process,
            vp_stage=options.vp_stage,
        )
        self._rope = RopeTable(self.config.kv_channels, cfg.rope_theta)  # not state: derived from cfg
        # megatron builds the torch RMSNorm weights in fp32: match the linears. The device is the
        # caller's choice (the whole model moves together; DeepSpeed does it for training).
        self.to(dtype=params_dtype)

    def rotary(self, steps: int) -> torch.Tensor:
        """RoPE angles of positions [0, steps) on this backbone's device (calm_dist/models/rope.py:
        megatron's own table would move itself to the current CUDA device)."""
        return self._rope(steps, next(self.decoder.parameters()).device)

    def new_cache(self, batch_size: int, max_steps: Optional[int] = None,
                  path: Literal["auto", "plain", "megatron"] = "auto") -> PlainKVCache | KVCache:
        """A KV cache for `forward(x, cache)`. `auto` takes the plain-torch path where it applies
        (one tensor-parallel rank, not te) and megatron's inference path otherwise."""
        max_steps = max_steps or self.cfg.max_position_embeddings
        if path == "auto":
            path = "plain" if supports_plain_decode(self) else "megatron"
        if path == "plain":
            if not supports_plain_decode(self):
                raise ValueError("the plain KV-cache path needs one tensor-parallel rank, the whole decoder "
                                 f"and a non-te attention backend (this one: {self.attention_backend}); "
                                 "use path='megatron'")
            return PlainKVCache(batch_size, max_steps)
        if path != "megatron":
            raise ValueError(f"path must be auto, plain or megatron, got {path!r}")
        return KVCache(batch_size, max_steps)

    def set_input_tensor(self, x_SBD: Optional[torch.Tensor]) -> None:
        """The previous pipeline stage's output, read instead of forward()'s input."""
        self.decoder.set_input_tensor(x_SBD)

    def forward_sequence_first(self, x_SBD: Optional[torch.Tensor], steps: int) -> torch.Tensor:
        """[steps, batch, hidden] in and out, as pipeline stages exchange them (under sequence
        parallelism, each tensor-parallel rank's slice of the steps). Without pre_process x_SBD
        is ignored: the block reads what `set_input_tensor` gave it."""
        sequence_parallel = self.options.sequence_parallel
        if sequence_parallel and self.options.pre_process:
            x_SBD = tensor_parallel.scatter_to_sequence_parallel_region(x_SBD)
        h_SBD = self.decoder(x_SBD, attention_mask=None, rotary_pos_emb=self.rotary(steps))
        if sequence_parallel and self.options.post_process:
            # The consumers (head, loss) are replicated over TP: each rank's gradient is the whole
            # one, so the backward only splits it (no reduce-scatter).
            h_SBD = tensor_parallel.gather_from_sequence_parallel_region(h_SBD, tensor_parallel_output_grad=False)
        return h_SBD

    @property
    def takes_attention_masks(self) -> bool:
        """Whether `forward_tree` can run: te's layers apply their own causal mask and ignore ours."""
        return self.attention_backend != "te"

    def forward_tree(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, allowed_SK: torch.Tensor,
                     context) -> torch.Tensor:
        """Steps at arbitrary positions after a recorded `context` (`SharedContext`), each seeing only
        the keys `allowed_SK[step, key]` marks: the context's steps, then these. Continuations
        branching from one context run in one forward (BrierLM's rollouts), and a step's output
        equals what the causal forward of its own path computes."""
        if not self.takes_attention_masks:
            raise ValueError("forward_tree needs an attention backend that takes explicit masks (not 'te')")
        if not (self.options.pre_process and self.options.post_process) or self.options.sequence_parallel:
            raise ValueError("forward_tree needs the whole decoder in one module, without sequence parallelism")
        x_SBD = x_BSD.transpose(0, 1).contiguous()
        rotary_SD = self.rotary(int(positions_S.max()) + 1)[positions_S]  # each step's own position
        # megatron's mask convention: True = masked out; [1, 1, sq, sk] broadcasts over batch and heads.
        with context.attending():
            h_SBD = self.decoder(x_SBD, attention_mask=~allowed_SK[None, None], rotary_pos_emb=rotary_SD)
        return h_SBD.transpose(0, 1)

    def forward(self, x_BSD: torch.Tensor, cache: Optional[PlainKVCache | KVCache] = None) -> torch.Tensor:
        steps = x_BSD.size(1)
        if cache is None:
            x_SBD = x_BSD.transpose(0, 1).contiguous()  # megatron is sequence-first
            return self.forward_sequence_first(x_SBD, steps).transpose(0, 1)

        if self.training:
            raise RuntimeError("the KV cache is for generation: call .eval() first")
        if cache.length + steps > cache.max_steps:
            raise ValueError(f"cache holds {cache.max_steps} steps; {cache.length} + {steps} do not fit")
        if isinstance(cache, PlainKVCache):
            return plain_cached_forward(self, x_BSD, cache)
        if cache.length > 0 and steps > 1:
            # megatron drops the causal mask type for every call after the prompt (it assumes one
            # new step), so a multi-step extension goes one step at a time.
            return torch.cat([self.forward(x_BSD[:, i : i + 1], cache) for i in range(steps)], dim=1)
        h_SBD = self.decoder(
            x_BSD.transpose(0, 1).contiguous(),
            attention_mask=None,
            rotary_pos_emb=self.rotary(cache.max_steps),  # the attention slices the positions
            inference_context=cache.context,
        )
        cache.context.sequence_len_offset += steps
        return h_SBD.transpose(0, 1)
