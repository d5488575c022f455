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
- the baseline's `lm_head.weight`: split by vocabulary rows, `torch.chunk` sizes (the last rank
  fewer when TP does not divide V; `calm_dist.parallel.vocab_parallel`);
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
_VOCAB_PARALLEL = "lm_head.weight"  # the baseline's output layer (top level only)
_EXTRA_STATE = "._extra_state"


def tensor_parallel_rule(key: str) -> tuple[int, int] | None:
    """(dimension, stride) of a tensor-parallel weight; None for a replicated one."""
    if key == _VOCAB_PARALLEL:
        return 0, 1
    for suffix, dim, stride in _TENSOR_PARALLEL:
        if key.endswith(suffix):
            return dim, stride
    return None


def layers_per_stage(num_layers: int, pipeline_parallel: int) -> int:
    if num_layers % pipeline_parallel:
        raise ValueError(f"{num_layers} layers do not split evenly into {pipeline_parallel} pipeline stages")
    return num_layers // pipeline_parallel


def global_key(local_key: str, pp_rank: int, per_stage: int) -> str:
    """A stage's key with its layer number made global (other keys unchanged)."""
    match = _LAYER.match(local_key)
    if not match:
        return local_key
    return f"{match.group(1)}{int(match.group(2)) + pp_rank * per_stage}{match.group(3)}"


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
    num_layers: int,
    tp_rank: int,
    tensor_parallel: int,
    pp_rank: int,
    pipeline_parallel: int,
) -> dict[str, torch.Tensor]:
    """The state dict of one (tp_rank, pp_rank) module whose own keys are `local_keys`."""
    per_stage = layers_per_stage(num_layers, pipeline_parallel)
    shard, missing = {}, []
    for key in local_keys:
        if key.endswith(_EXTRA_STATE):
            continue
        source = global_key(key, pp_rank, per_stage)
        if source not in full:
            missing.append(source)
            continue
        shard[key] = tensor_shard(full[source], key, tp_rank, tensor_parallel).clone()
    if missing:
        raise KeyError(f"the full state dict lacks {len(missing)} weights this stage needs, e.g. {missing[:3]}")
    return shard


def merge_state_dicts(
    shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], num_layers: int
) -> dict[str, torch.Tensor]:
    """One state dict from every (tp_rank, pp_rank) shard: layers renumbered, TP parts joined.
    A weight held by several stages (none in our models) must agree, as replicas must."""
    tensor_parallel = 1 + max(tp for tp, _ in shards)
    pipeline_parallel = 1 + max(pp for _, pp in shards)
    expected = {(tp, pp) for tp in range(tensor_parallel) for pp in range(pipeline_parallel)}
    if set(shards) != expected:
        raise ValueError(f"shards missing for (tp_rank, pp_rank) {sorted(expected - set(shards))}")
    per_stage = layers_per_stage(num_layers, pipeline_parallel)
    merged: dict[str, torch.Tensor] = {}
    for pp in range(pipeline_parallel):
        keys = list(shards[(0, pp)])
        for tp in range(1, tensor_parallel):
            if list(shards[(tp, pp)]) != keys:
                raise ValueError(f"stage {pp}: tensor ranks 0 and {tp} hold different weights")
        for key in keys:
            if key.endswith(_EXTRA_STATE):
                continue
            full = merge_tensor([shards[(tp, pp)][key] for tp in range(tensor_parallel)], key)
            name = global_key(key, pp, per_stage)
            if name in merged and not torch.equal(merged[name], full):
                raise ValueError(f"{name}: held by several pipeline stages that disagree")
            merged[name] = full
    return merged
