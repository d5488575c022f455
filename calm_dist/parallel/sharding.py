"""Tensor- and pipeline-parallel shards of a model's state dict, and back.

One set of rules serves both directions: `shard_state_dict` cuts the single-process state dict
(a converted checkpoint, a seed model) into what one (tp_rank, pp_rank) holds, and
`merge_state_dicts` puts the shards of a 3d checkpoint together again. Keys are the model's own
(`backbone.decoder.layers.{i}.` with i local to the pipeline stage in a shard, global when merged).

megatron's layouts (megatron-core 0.16, local and TE specs):
- `linear_qkv.weight`: column-parallel, rows grouped per query group, so a contiguous split of
  dim 0 gives each rank whole groups;
- `linear_fc1.weight`: column-parallel SwiGLU [gate; up] with stride 2: each rank holds
  [its gate rows; its up rows];
- `linear_proj.weight`, `linear_fc2.weight`: row-parallel, split along dim 1;
- the input `embed_tokens.weight` and the baseline's `lm_head.weight`: split by vocabulary rows,
  `torch.chunk` sizes (the last rank fewer when TP does not divide V;
  `calm_dist.parallel.vocab_parallel`);
- everything else (norms, embeddings, compressor, energy head, autoencoder) is replicated;
- `._extra_state` entries (megatron's linear layers keep None there) are not weights: skipped.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

_LAYER = re.compile(r"^(backbone\.decoder\.layers\.)(\d+)(\..*)$")
# (suffix, dimension, stride)
_TENSOR_PARALLEL = (
    ("self_attention.linear_qkv.weight", 0, 1),
    ("mlp.linear_fc1.weight", 0, 2),
    ("self_attention.linear_proj.weight", 1, 1),
    ("mlp.linear_fc2.weight", 1, 1),
)
_VOCAB_PARALLEL = ("embed_tokens.weight", "lm_head.weight")  # top level only (not the autoencoder's)
_EXTRA_STATE = "._extra_state"


def tensor_parallel_rule(key: str) -> tuple[int, int] | None:
    """(dimension, stride) of a tensor-parallel weight; None for a replicated one."""
    if key in _VOCAB_PARALLEL:
        return 0, 1
    for suffix, dim, stride in _TENSOR_PARALLEL:
        if key.endswith(suffix):
            return dim, stride
    return None


def layer_offset(num_layers: int, pipeline_parallel: int, pp_rank: int, virtual_stages: int = 1,
                 vp_stage: int = 0) -> int:
    """The first global layer of a model chunk: `num_layers / (PP x V)` layers each, in megatron's
    interleaved order (chunk v of every stage comes before chunk v + 1 of any)."""
    chunks = pipeline_parallel * virtual_stages
    if num_layers % chunks:
        raise ValueError(f"{num_layers} layers do not split evenly into {pipeline_parallel} pipeline stages "
                         f"x {virtual_stages} virtual stages")
    return (vp_stage * pipeline_parallel + pp_rank) * (num_layers // chunks)


def global_key(local_key: str, offset: int) -> str:
    """A chunk's key with its layer number made global (other keys unchanged)."""
    match = _LAYER.match(local_key)
    if not match:
        return local_key
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def tensor_shard(full: torch.Tensor, key: str, tp_rank: int, tensor_parallel: int) -> torch.Tensor:
    """This tensor rank's part of a full weight (the whole of a replicated one)."""
    rule = tensor_parallel_rule(key)
    if rule is None or tensor_parallel == 1:
        return full
    dim, stride = rule
    pieces = full.chunk(stride * tensor_parallel, dim=dim)
    return torch.cat(pieces[tp_rank::tensor_parallel], dim=dim)


def merge_tensor(shards: list[torch.Tensor], key: str) -> torch.Tensor:
    """The full weight from its tensor ranks' parts, in rank order."""
    rule = tensor_parallel_rule(key)
    if rule is None or len(shards) == 1:
        first = shards[0]
        for other in shards[1:]:
            if not torch.equal(first, other):
                raise ValueError(f"{key}: replicated across tensor ranks but the ranks disagree")
        return first
    dim, stride = rule
    parts = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([parts[r][s] for s in range(stride) for r in range(len(shards))], dim=dim)


def shard_state_dict(
    full: Mapping[str, torch.Tensor],
    local_keys: list[str],
    offset: int,
    tp_rank: int,
    tensor_parallel: int,
) -> dict[str, torch.Tensor]:
    """The state dict of one model chunk on one tensor rank, whose own keys are `local_keys` and
    whose first layer is global layer `offset` (`layer_offset`). 0-d values (an optimizer's step
    count) are the same on every rank: copied as they are."""
    shard, missing = {}, []
    for key in local_keys:
        if key.endswith(_EXTRA_STATE):
            continue
        source = global_key(key, offset)
        if source not in full:
            missing.append(source)
            continue
        value = full[source]
        shard[key] = value.clone() if value.dim() == 0 else tensor_shard(value, key, tp_rank, tensor_parallel).clone()
    if missing:
        raise KeyError(f"the full state dict lacks {len(missing)} weights this stage needs, e.g. {missing[:3]}")
    return shard


def merge_state_dicts(
    shards: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]], num_layers: int
) -> dict[str, torch.Tensor]:
    """One state dict from the shards of every (tp_rank, pp_rank, vp_stage): layers renumbered,
    TP parts joined. A weight held by several chunks (none in our models) must agree."""
    tensor_parallel, pipeline_parallel, virtual_stages = (1 + max(key[i] for key in shards) for i in range(3))
    expected = {(tp, pp, vp) for tp in range(tensor_parallel) for pp in range(pipeline_parallel)
                for vp in range(virtual_stages)}
    if set(shards) != expected:
        raise ValueError(f"shards missing for (tp_rank, pp_rank, vp_stage) {sorted(expected - set(shards))}")
    merged: dict[str, torch.Tensor] = {}
    for pp in range(pipeline_parallel):
        for vp in range(virtual_stages):
            keys = list(shards[(0, pp, vp)])
            for tp in range(1, tensor_parallel):
                if list(shards[(tp, pp, vp)]) != keys:
                    raise ValueError(f"stage {pp}, chunk {vp}: tensor ranks 0 and {tp} hold different weights")
            offset = layer_offset(num_layers, pipeline_parallel, pp, virtual_stages, vp)
            for key in keys:
                if key.endswith(_EXTRA_STATE):
                    continue
                full = merge_tensor([shards[(tp, pp, vp)][key] for tp in range(tensor_parallel)], key)
                name = global_key(key, offset)
                if name in merged and not torch.equal(merged[name], full):
                    raise ValueError(f"{name}: held by several pipeline chunks that disagree")
                merged[name] = full
    return merged
