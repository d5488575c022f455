"""Attention backends, an explicit choice.

- `flash_attn`: the flash-attn package (GPU only, fp16/bf16).
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`; FlashAttention kernels on CUDA, a
  plain implementation on CPU.
- `te`: megatron's Transformer Engine layer spec; TE picks flash-attn or cuDNN attention itself.
- `local`: megatron-core's unfused `DotProductAttention` (the reference implementation).

`SDPACoreAttention` and `FlashAttnCoreAttention` are drop-in `core_attention` modules for a
megatron layer spec: megatron's `DotProductAttention` constructor and forward, query
[sq, b, np, hn], key/value [sk, b, ng, hn] (ng <= np: GQA), output [sq, b, np * hn].
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "sdpa", "te", "local")
_INSTALL_HINTS = {
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "te": "pip install --no-build-isolation 'transformer-engine[pytorch]'",
}


class AttentionBackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here."""


def _importable(backend: str) -> bool:
    try:
        if backend == "flash_attn":
            from flash_attn import flash_attn_func  # noqa: F401  # lazy: optional (requirements-gpu.txt)
        elif backend == "te":
            import transformer_engine.pytorch  # noqa: F401  # lazy: optional (requirements-gpu.txt)
    except (ImportError, OSError):  # a CPU-only build of either fails at import
        return False
    return True


def resolve_attention_backend(
    requested: str, device: torch.device, dtype: Optional[torch.dtype] = None
) -> str:
    """The backend to use for `requested` ("auto" or one of BACKENDS) on `device`.

    `auto` picks te > flash_attn > sdpa on CUDA (flash_attn only for fp16/bf16 when `dtype` is
    given), sdpa on CPU. Asking for a backend that cannot run here raises
    `AttentionBackendUnavailable` naming what is missing.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if requested == "auto":
        candidates = ["te", "flash_attn"] if on_cuda else []
        if dtype == torch.float32 and "flash_attn" in candidates:
            candidates.remove("flash_attn")  # flash-attn has no fp32 kernels
        chosen = next((name for name in candidates if _importable(name)), "sdpa")
        if chosen != "sdpa":
            reason = "auto: the fastest one installed for CUDA"
        elif on_cuda:
            reason = "auto: transformer-engine and flash-attn not usable, sdpa uses torch's flash kernels"
        else:
            reason = f"auto: no CUDA device ({device.type})"
    elif requested in ("sdpa", "local"):
        chosen, reason = requested, "requested"
    elif requested in _INSTALL_HINTS:
        if not on_cuda:
            raise AttentionBackendUnavailable(
                f"attention backend {requested!r} needs a CUDA GPU, but the device is {device}; "
                "use 'sdpa' or 'local' on CPU (or 'auto')"
            )
        if not _importable(requested):
            raise AttentionBackendUnavailable(
                f"attention backend {requested!r} is not installed (or its CUDA build is broken): "
                f"`{_INSTALL_HINTS[requested]}` against a CUDA build of torch, on a GPU machine"
            )
        chosen, reason = requested, "requested"
    else:
        raise ValueError(f"unknown attention backend {requested!r}; expected 'auto' or one of {BACKENDS}")
    logger.info("attention backend: %s (%s)", chosen, reason)
    return chosen


def bottom_right_causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """[sq, sk] boolean mask, True where attention is allowed: query i sees keys <= sk - sq + i
    (the last sq of sk steps, as when extending a KV cache)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


class _CoreAttention(MegatronModule):
    """Constructor shared with megatron's `DotProductAttention` (as a layer spec builds it)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "context parallelism needs the 'te' backend"
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        # The layer's own mask type is the authority: megatron's static inference context passes
        # attn_mask_type=no_mask for every call after the prompt (it assumes one new step).
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _dropout(self) -> tuple[float, contextlib.AbstractContextManager]:
        """Dropout probability now, and the RNG context to draw it in (training only). Heads are
        sharded over tensor-parallel ranks, so draw from the model-parallel stream as megatron does."""
        if not self.training or self.dropout_p == 0.0:
            return 0.0, contextlib.nullcontext()
        if self.config.sequence_parallel:
            return self.dropout_p, contextlib.nullcontext()
        return self.dropout_p, tensor_parallel.get_cuda_rng_tracker().fork()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """megatron's `DotProductAttention.forward` signature; the backend's `_attend` does the work."""
        assert packed_seq_params is None and attention_bias is None, "packed sequences and attention bias need 'te'"
        dropout_p, rng = self._dropout()
        with rng:
            return self._attend(query, key, value, attention_mask, dropout_p)

    def _attend(self, query, key, value, attention_mask, dropout_p: float) -> torch.Tensor:
        raise NotImplementedError


class SDPACoreAttention(_CoreAttention):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`."""

    def _attend(self, query, key, value, attention_mask, dropout_p: float) -> torch.Tensor:
        sq, b, sk = query.size(0), query.size(1), key.size(0)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        attn_mask, is_causal = None, False
        if attention_mask is not None:  # megatron's convention: True = masked out
            attn_mask = ~attention_mask
        elif self.causal and sq == sk:
            is_causal = True
        elif self.causal and sq > 1:
            attn_mask = bottom_right_causal_mask(sq, sk, query.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=self.softmax_scale, enable_gqa=self.num_groups < self.num_heads,
        )  # fmt: skip
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


class FlashAttnCoreAttention(SDPACoreAttention):
    """Core attention through the flash-attn package (CUDA, fp16/bf16); an explicit mask (BrierLM's
    rollout trees), which flash-attn cannot take, goes through torch's SDPA instead."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from flash_attn import flash_attn_func  # lazy: optional (requirements-gpu.txt)

        self._flash_attn_func = flash_attn_func

    def _attend(self, query, key, value, attention_mask, dropout_p: float) -> torch.Tensor:
        if attention_mask is not None:
            return super()._attend(query, key, value, attention_mask, dropout_p)
        sq, b = query.size(0), query.size(1)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, hn]; GQA native
        # flash-attn >= 2.1 aligns a causal mask bottom-right when sq < sk (KV-cache steps).
        out = self._flash_attn_func(
            q, k, v, dropout_p=dropout_p, softmax_scale=self.softmax_scale, causal=self.causal and sq > 1,
        )  # fmt: skip
        return out.transpose(0, 1).reshape(sq, b, -1)


CORE_ATTENTION = {
    "sdpa": SDPACoreAttention,
    "flash_attn": FlashAttnCoreAttention,
    "local": DotProductAttention,
}  # `te` uses megatron's whole Transformer Engine layer spec instead
