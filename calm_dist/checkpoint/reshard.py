"""The 3d checkpoint's optimizer state keyed by parameter name, and resuming a 3d checkpoint under
another tensor/pipeline layout (same data-parallel size).

A 3d checkpoint (calm_dist/engines/megatron_3d.py) keeps, per (tensor, pipeline) rank, the model
weights and, per (tensor, pipeline, data) rank, AdamW's state of the parameters that rank steps,
keyed like the weights: by the parameter's name in its model chunk (stage-local layer numbers).
So the project's one set of TP/PP rules (calm_dist/parallel/sharding.py) applies to both: when
the layout changed, every rank reads all the saved files, merges weights and moments into full
tensors (global layer numbers) and cuts its own shard. That costs the whole model and its Adam
moments in each rank's CPU memory for the time of the load; megatron-core's dist_checkpointing,
the planned replacement, would read each rank's slices only.

The data-parallel size must stay: each replica's data-loader position is saved on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from calm_dist.checkpoint.integrity import META
from calm_dist.checkpoint.saved_layout import layout_of
from calm_dist.parallel.sharding import global_key, layer_offset, merge_state_dicts, shard_state_dict
from calm_dist.parallel.state import ParallelLayout

# The optimizer files' format: moments keyed by parameter name (before it: torch's index-keyed
# optimizer state_dict, which only the layout that wrote it can read).
NAMED_MOMENTS = "named-moments-1"
_EXTRA_STATE = "._extra_state"  # megatron's per-layer extra state: not a weight
_TRACKER = "megatron_tracker"  # the rank file's RNG entry of megatron's tracker (calm_dist/training/rng.py)


class LayoutChangeError(ValueError):
    """A 3d checkpoint cannot be loaded under this run's layout (names the file or key)."""


def model_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}_model_states.pt"


def optim_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:03d}_dp{dp_rank:03d}.pt"


@dataclass(frozen=True)
class SavedLayout:
    """The parallel layout a 3d checkpoint was written with (from its meta.json)."""

    tensor_parallel: int
    pipeline_parallel: int
    virtual_stages: int
    data_parallel: int
    zero_stage: int
    num_layers: int

    @classmethod
    def read(cls, directory: Path) -> SavedLayout | None:
        """None for a checkpoint without meta.json or not of the 3d regime."""
        path = directory / META
        if not path.is_file():
            return None
        return cls.from_meta(json.loads(path.read_text()))

    @classmethod
    def from_meta(cls, meta: dict) -> SavedLayout | None:
        layout = layout_of(meta)
        if layout["regime"] != "3d":
            return None
        return cls(tensor_parallel=layout["tensor_parallel"], pipeline_parallel=layout["pipeline_parallel"],
                   virtual_stages=layout["virtual_stages"], data_parallel=layout["data_parallel"],
                   zero_stage=layout["zero_stage"], num_layers=meta["config"]["model"]["num_layers"])

    def same_as(self, layout: ParallelLayout) -> bool:
        return (self.tensor_parallel, self.pipeline_parallel, self.virtual_stages, self.data_parallel) == (
            layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_stages, layout.data_parallel)

    def rank(self, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        """The global rank of a position: megatron orders ranks TP fastest, then DP, then PP."""
        return tp_rank + self.tensor_parallel * (dp_rank + self.data_parallel * pp_rank)

    @property
    def sharded_optimizer(self) -> bool:
        """ZeRO-1: each data-parallel rank's file holds the moments of its share of parameters
        (otherwise every replica holds all of them, identical: data-parallel rank 0's suffice)."""
        return self.zero_stage == 1 and self.data_parallel > 1


def describe(layout: SavedLayout | ParallelLayout) -> str:
    virtual = f" ({layout.virtual_stages} virtual stages)" if layout.virtual_stages > 1 else ""
    return f"TP={layout.tensor_parallel} x PP={layout.pipeline_parallel}{virtual} x DP={layout.data_parallel}"


def source_rank(saved: SavedLayout, layout: ParallelLayout) -> int:
    """The saved rank whose rank file (data-loader position, RNG streams) this rank continues: the
    same replica; the stage in the same place (first to first, last to last: the last stage draws
    the energy head's noise, so a TP-only change continues its stream exactly; others in
    proportion); the same tensor rank, modulo the saved TP (the default generator is the same on
    the tensor ranks of a stage; `continued_rank_state` keeps a new tensor rank's own tracker)."""
    if saved.data_parallel != layout.data_parallel:
        raise LayoutChangeError(
            f"the checkpoint was written with {saved.data_parallel} data-parallel replicas, this run has "
            f"{layout.data_parallel}: each replica's data position is saved on its own and cannot be re-split. "
            f"Resume with world size = tensor_parallel x pipeline_parallel x {saved.data_parallel}")
    if layout.pipeline_parallel == 1:
        stage = saved.pipeline_parallel - 1
    else:
        stage = round(layout.pp_rank * (saved.pipeline_parallel - 1) / (layout.pipeline_parallel - 1))
    return saved.rank(layout.tp_rank % saved.tensor_parallel, stage, layout.dp_rank)


def continued_rank_state(rank_state: dict, saved: SavedLayout, layout: ParallelLayout) -> dict:
    """The `source_rank`'s saved state as this rank continues it. A tensor rank the saved layout
    did not have (TP grew) keeps the tracker streams seeded for it (megatron's per-tensor-rank
    dropout streams) instead of a copy of tensor rank 0's, which would repeat its masks."""
    rng = rank_state.get("rng")
    if layout.tp_rank >= saved.tensor_parallel and isinstance(rng, dict) and _TRACKER in rng:
        return {**rank_state, "rng": {key: value for key, value in rng.items() if key != _TRACKER}}
    return rank_state


@dataclass
class MergedCheckpoint:
    """A 3d checkpoint's state as one model's: global parameter names, full tensors."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # kind -> name -> tensor
    lr_groups: dict[str, tuple[float, float]] = field(default_factory=dict)  # group -> (base lr, last lr)
    lr_scheduler: dict | None = None  # one rank's schedule state (its step counts: the same on all)
    client_state: dict = field(default_factory=dict)

    def moment_names(self) -> set[str]:
        return {name for values in self.moments.values() for name in values}


def read_merged(directory: Path, saved: SavedLayout, with_optimizer: bool) -> MergedCheckpoint:
    """Every saved rank's weights (and, `with_optimizer`, moments and LR-schedule groups) merged.
    FileNotFoundError naming the missing files before anything is read."""
    grid = [(tp, pp) for pp in range(saved.pipeline_parallel) for tp in range(saved.tensor_parallel)]
    dp_ranks = range(saved.data_parallel if saved.sharded_optimizer else 1)
    optim_files = [optim_file_name(tp, pp, dp) for tp, pp in grid for dp in dp_ranks] if with_optimizer else []
    missing = [name for name in [model_file_name(tp, pp) for tp, pp in grid] + optim_files
               if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks {', '.join(missing)}: resuming it under another layout reads every rank's "
            f"files (written with {describe(saved)}), and the checkpoint is incomplete. Resume from an "
            "earlier checkpoint (training.load_step=N)")
    weight_shards = {}
    for tp, pp in grid:
        chunks = _load(directory / model_file_name(tp, pp))
        if len(chunks) != saved.virtual_stages:
            raise LayoutChangeError(f"{directory / model_file_name(tp, pp)} holds {len(chunks)} model chunks, "
                                    f"its meta.json says {saved.virtual_stages} virtual stages")
        for vp in range(saved.virtual_stages):
            weight_shards[(tp, pp, vp)] = chunks[f"chunk{vp}"]
    merged = MergedCheckpoint(weights=merge_named(weight_shards, saved.num_layers, f"{directory}: weights"))
    if with_optimizer:
        key_orders = {position: list(shard) for position, shard in weight_shards.items()}
        del weight_shards  # only the full weights from here on
        _merge_optimizer_files(directory, saved, grid, dp_ranks, key_orders, merged)
    return merged


def _merge_optimizer_files(directory: Path, saved: SavedLayout, grid, dp_ranks,
                           key_orders: dict[tuple[int, int, int], list[str]], merged: MergedCheckpoint) -> None:
    moment_shards: dict[str, dict[tuple[int, int, int], dict[str, torch.Tensor]]] = {}
    for tp, pp in grid:
        by_chunk: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(saved.virtual_stages)]
        for dp in dp_ranks:  # under ZeRO-1 each holds some parameters' moments: a union by name
            path = directory / optim_file_name(tp, pp, dp)
            state = _load(path)
            if state.get("format") != NAMED_MOMENTS:
                raise LayoutChangeError(
                    f"{path} holds torch's index-keyed optimizer state (written before named moments), which "
                    f"only its own layout can read: resume with {describe(saved)}, or with "
                    "training.load_optimizer=false (weights, step and data position load; Adam's moments "
                    "and the LR schedule start afresh)")
            for vp in range(saved.virtual_stages):
                for kind, values in state["moments"][f"chunk{vp}"].items():
                    by_chunk[vp].setdefault(kind, {}).update(values)
            for name, base, last in zip(state["lr_groups"], state["lr_scheduler"]["base_lrs"],
                                        state["lr_scheduler"]["_last_lr"]):
                merged.lr_groups.setdefault(name, (base, last))
            if merged.lr_scheduler is None:
                merged.lr_scheduler, merged.client_state = state["lr_scheduler"], state["client_state"]
        for vp, kinds in enumerate(by_chunk):
            order = key_orders[(tp, pp, vp)]  # the same on every tensor rank of a stage
            for kind, values in kinds.items():
                moment_shards.setdefault(kind, {})[(tp, pp, vp)] = {n: values[n] for n in order if n in values}
    for kind, shards in moment_shards.items():
        for position in key_orders:
            shards.setdefault(position, {})
        merged.moments[kind] = merge_named(shards, saved.num_layers, f"{directory}: optimizer {kind}")


def merge_named(shards: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]], num_layers: int,
                what: str) -> dict[str, torch.Tensor]:
    """`merge_state_dicts` for weights and moments alike. 0-d entries (AdamW's step count) are the
    same on every tensor rank of a parameter: taken as they are, checked to agree."""
    tensors = {position: {n: t for n, t in values.items() if not _is_scalar(t)}
               for position, values in shards.items()}
    try:
        merged = merge_state_dicts(tensors, num_layers)
    except ValueError as err:
        raise LayoutChangeError(f"{what}: {err}") from None
    pipeline_parallel, virtual_stages = (1 + max(key[i] for key in shards) for i in (1, 2))
    for (_, pp, vp), values in shards.items():
        offset = layer_offset(num_layers, pipeline_parallel, pp, virtual_stages, vp)
        for name, value in values.items():
            if not _is_scalar(value):
                continue
            full_name = global_key(name, offset)
            if full_name in merged and not torch.equal(merged[full_name], value):
                raise LayoutChangeError(f"{what}: {full_name} differs between tensor ranks")
            merged[full_name] = value
    return merged


def shard_named(full: Mapping[str, torch.Tensor], local_names: list[str], offset: int, tp_rank: int,
                tensor_parallel: int, what: str) -> dict[str, torch.Tensor]:
    """The part of `full` one model chunk on one tensor rank holds (the inverse of `merge_named`):
    keys `local_names`, its first layer global layer `offset`."""
    try:
        return shard_state_dict(full, local_names, offset, tp_rank, tensor_parallel)
    except KeyError as err:
        raise LayoutChangeError(f"{what}: {err.args[0]}") from None


def check_same_names(what: str, needed: set[str], saved: set[str]) -> None:
    """Strict: every name this run needs is in the checkpoint, and nothing is left over."""
    missing, extra = sorted(needed - saved), sorted(saved - needed)
    if missing or extra:
        parts = [f"{len(missing)} this run needs are missing, e.g. {missing[:3]}" if missing else "",
                 f"{len(extra)} are in the checkpoint but not in this run's model, e.g. {extra[:3]}" if extra else ""]
        raise LayoutChangeError(f"{what}: " + "; ".join(p for p in parts if p))


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- AdamW's state keyed by parameter name -----------------------------------------------------


def named_moments(optimizer: torch.optim.Optimizer, named_params) -> dict[str, dict[str, torch.Tensor]]:
    """{kind: {name: tensor}} (exp_avg, exp_avg_sq, step) of the parameters `optimizer` holds
    state for, among `named_params` (a model chunk's `named_parameters()`)."""
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in named_params:
        for kind, value in optimizer.state.get(param, {}).items():  # .get: the defaultdict stays as it is
            moments.setdefault(kind, {})[name] = value
    return moments


def restore_moments(optimizer: torch.optim.Optimizer, named_params, moments: Mapping[str, Mapping[str, torch.Tensor]],
                    what: str) -> None:
    """Set `optimizer`'s state of the parameters it steps among `named_params` from `named_moments`
    output: every one found, shapes checked, none left over. Its parameter groups (lr, weight
    decay) stay this run's."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    restored = set()
    for name, param in named_params:
        if id(param) not in stepped or not moments:  # no moments at all: saved before the first step
            continue
        state = {}
        for kind, values in moments.items():
            if name not in values:
                raise LayoutChangeError(f"{what}: no optimizer {kind} for parameter {name}")
            value = values[name]
            if _is_scalar(value):
                state[kind] = value.cpu()  # AdamW's step count lives on the CPU (as torch's own loading does)
            elif value.shape != param.shape:
                raise LayoutChangeError(f"{what}: optimizer {kind} of {name} has shape {tuple(value.shape)}, "
                                        f"the parameter {tuple(param.shape)}")
            else:
                state[kind] = value.to(device=param.device, dtype=param.dtype)
        optimizer.state[param] = state
        restored.add(name)
    extra = {name for values in moments.values() for name in values} - restored
    if extra:
        raise LayoutChangeError(f"{what}: optimizer state for {len(extra)} parameters this rank does not step, "
                                f"e.g. {sorted(extra)[:3]}")


def chunk_weight_names(state_dict_keys, offset: int) -> set[str]:
    """A chunk's weights under their global names (megatron's extra state is not a weight)."""
    return {global_key(key, offset) for key in state_dict_keys if not key.endswith(_EXTRA_STATE)}


def extra_state(state_dict: Mapping) -> dict:
    """megatron's per-layer extra state of a chunk (not a weight): not resharded, kept as this run has it."""
    return {key: value for key, value in state_dict.items() if key.endswith(_EXTRA_STATE)}
