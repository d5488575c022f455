"""The 3d regime's engine: megatron-core tensor and pipeline parallelism, ZeRO-1 over data
parallelism.

DeepSpeed's ZeRO-2/3 cannot be combined with pipeline parallelism, so this regime does without
DeepSpeed and uses megatron-core's own pieces: its schedules run forward and backward of all
micro-batches (1F1B, interleaved with virtual stages); each model chunk is wrapped in megatron-core's
`DistributedDataParallel` (gradients accumulate in its contiguous fp32 buffers) and
`finalize_model_grads` averages them over the data-parallel group and sums the sequence-parallel
ones over the tensor ranks; megatron-core's `get_grad_norm_fp32` takes the norm of the whole model
(over tensor and pipeline ranks, each replicated weight counted once, by the `tensor_model_parallel`
attribute megatron's layers set) and `clip_grad_by_total_norm_fp32` clips. AdamW steps, sharded
over the data-parallel group (torch's ZeroRedundancyOptimizer: ZeRO stage 1) when
`parallel.zero_stage` is 1.

With `parallel.virtual_pipeline_stages` V > 1 a rank holds V model chunks. Checkpoint files, in the
checkpoint manager's `global_stepN/`:

    mp_rank_{tp:02d}_{pp:03d}_model_states.pt      weights of one (tensor, pipeline) rank:
                                                   {"chunk0": state dict, "chunk1": ...}
    optim_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt      that rank's AdamW state and LR schedule:
        {"format": "named-moments-1", "moments": {"chunk0": {"exp_avg": {name: tensor}, "exp_avg_sq": ...,
         "step": ...}, ...}, "lr_groups": [group names], "lr_scheduler": state dict, "client_state": {...}}

Moments are keyed like the weights (parameter name, stage-local layer numbers; under ZeRO-1 each
data-parallel rank's file holds its share), so a checkpoint resumes under another TP/PP layout:
calm_dist/checkpoint/reshard.py merges and re-cuts both with the project's sharding rules.
(megatron-core's `dist_checkpointing` would do the re-cutting too, but it needs megatron's
sharded-state-dict protocol on every module, including the energy head and the frozen
autoencoder, and its optimizer side is megatron's DistributedOptimizer, not torch's; see
docs/checkpoints.md.)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import clip_grads
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from calm_dist.checkpoint.reshard import (
    NAMED_MOMENTS,
    LayoutChangeError,
    MergedCheckpoint,
    SavedLayout,
    check_same_names,
    chunk_weight_names,
    describe,
    extra_state,
    model_file_name,
    named_moments,
    optim_file_name,
    read_merged,
    restore_moments,
    shard_named,
)
from calm_dist.config.schema import JobConfig
from calm_dist.engines.initial_weights import load_initial_weights
from calm_dist.engines.model_build import build_model
from calm_dist.engines.optimizer import build_optimizer
from calm_dist.engines.protocol import NextBatch, OnSkip
from calm_dist.evaluation.scorer import seed_streams
from calm_dist.models.backbone import BackboneOptions
from calm_dist.models.calm import unconditional_energy
from calm_dist.models.kinds import CALM_KIND, model_kind
from calm_dist.parallel.pipeline import (
    PipelineStage,
    broadcast_from_last_stage,
    chunk_place,
    run_schedule,
    strip_to_stage,
)
from calm_dist.parallel.sharding import global_key, layer_offset
from calm_dist.parallel.state import ParallelLayout
from calm_dist.parallel.vocab_parallel import parallelize_vocabulary

logger = logging.getLogger(__name__)


def model_file(layout: ParallelLayout) -> str:
    return model_file_name(layout.tp_rank, layout.pp_rank)


def optim_file(layout: ParallelLayout) -> str:
    return optim_file_name(layout.tp_rank, layout.pp_rank, layout.dp_rank)


class ModelParallelEngine:
    ds_config = None  # no DeepSpeed in this regime

    def __init__(self, chunks: list[PipelineStage], cfg: JobConfig, layout: ParallelLayout):
        self.chunks, self.cfg, self.layout = chunks, cfg, layout
        self.kind = model_kind(cfg.training.stage)
        # The loss and the kind's logged outputs (CALM: fidelity, diversity, state cosine).
        self.report_fields = tuple(field for _, field in self.kind.logged_outputs)
        self.report_names = ("loss",) + self.report_fields
        # What the trainer reads as "the model": the chunk's model, or all of them in order.
        self.module = chunks[0].model if len(chunks) == 1 else torch.nn.ModuleList(c.model for c in chunks)
        self.dp_group = ps.get_data_parallel_group()
        self.model_parallel_group = ps.get_model_parallel_group()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.device = self.params[0].device  # collectives need tensors where the backend is (NCCL: GPU)
        # megatron-core's data parallelism: gradients accumulate over the micro-batches into one
        # contiguous fp32 buffer per chunk, reduced once per step by finalize_model_grads.
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
        self.replicas = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
        zero1 = self.dp_group if cfg.parallel.zero_stage == 1 and layout.data_parallel > 1 else None
        # ZeRO-1: the schedule sets the wrapper's param_groups, which it copies to its shard at each step.
        self.optimizer, self.scheduler = build_optimizer(self.module, cfg, zero1_group=zero1, fused=False)
        self.grad_norm: float | None = None
        logger.info("3d engine: TP=%d PP=%d (x %d virtual) DP=%d, megatron-core DDP%s", layout.tensor_parallel,
                    layout.pipeline_parallel, layout.virtual_stages, layout.data_parallel,
                    ", ZeRO-1 optimizer" if zero1 is not None else "")

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, next_batch: NextBatch, on_skip: OnSkip) -> dict[str, float]:
        """One step of the 3d regime: the pipeline schedule runs all micro-batches; a non-finite
        loss or gradient norm on any replica skips the whole step on every rank (the next batches
        take its place)."""
        accum, in_a_row = self.cfg.derived.gradient_accumulation_steps, 0
        while (report := self.train_batch([next_batch() for _ in range(accum)])) is None:
            in_a_row += 1
            on_skip(accum, in_a_row, "non-finite loss or gradients")
        extras = {key: report[field] for key, field in self.kind.logged_outputs}
        return {"loss": report["loss"], **extras, "grad_norm": self.grad_norm, "lr": max(self.get_lr())}

    def train_batch(self, micro_batches: list[torch.Tensor]) -> dict[str, float] | None:
        """Forward, backward and (unless a loss or the gradient norm is non-finite) an optimizer
        step over the micro-batches of one step. Returns the mean reports, or None when the step
        was skipped on every rank (no weight changed)."""
        for chunk in self.chunks:
            chunk.train()
        self._zero_grads()
        reports = run_schedule(self.replicas, micro_batches, report_fields=self.report_fields)
        summary = self._summarise(reports, len(micro_batches))
        if not bool(torch.isfinite(summary).all()):
            self._zero_grads()
            return None
        finalize_model_grads(self.replicas)
        for param in self.params:  # what the optimizer reads: the reduced buffer
            param.grad = param.main_grad
        self.grad_norm = self._clip_grads(self.cfg.optimizer.grad_clip)
        if not math.isfinite(self.grad_norm):  # the same on every rank: the norm is global
            self._zero_grads()
            return None
        self.optimizer.step()
        self.scheduler.step()
        return dict(zip(self.report_names, summary.tolist()))

    def _zero_grads(self) -> None:
        for param in self.params:
            param.grad = None
        for replica in self.replicas:
            replica.zero_grad_buffer()

    def _summarise(self, reports: list[dict], count: int) -> torch.Tensor:
        """Mean loss (and CALM's fidelity, diversity) over the micro-batches of every replica, on
        every rank; NaN everywhere if any replica saw a non-finite loss (the sum spreads it)."""
        values = torch.zeros(len(self.report_names), dtype=torch.float64, device=self.device)
        if self.layout.last_stage:
            values = torch.tensor([sum(float(r[n]) for r in reports) / count for n in self.report_names],
                                  dtype=torch.float64, device=self.device)
        values = broadcast_from_last_stage(values, self.layout)
        if self.layout.data_parallel > 1:
            dist.all_reduce(values, group=self.dp_group)
            values /= self.layout.data_parallel
        return values

    def _clip_grads(self, max_norm: float) -> float:
        """The global gradient norm (whole model, each weight counted once) and clipping to
        max_norm, by megatron-core."""
        counted = [p.grad for p in self.params if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
        norm = float(clip_grads.get_grad_norm_fp32(counted, grad_stats_parallel_group=self.model_parallel_group))
        if max_norm > 0 and math.isfinite(norm):
            clip_grads.clip_grad_by_total_norm_fp32(self.params, max_norm, norm)
        return norm

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_loss(self, micro_batches: list[torch.Tensor]) -> float:
        """Mean loss of the micro-batches (forward only), on every rank of the replica."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            reports = run_schedule(self.replicas, micro_batches, forward_only=True)
        finally:
            for chunk in self.chunks:
                chunk.train()
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.layout.last_stage:
            value[0] = sum(float(r["loss"]) for r in reports) / len(micro_batches)
        return float(broadcast_from_last_stage(value, self.layout)[0])

    def unconditional_energy(self, blocks_BT: torch.Tensor) -> float:
        """CALM's unconditional energy level on these blocks (the collapse alarm's reference),
        computed where the frozen autoencoder lives (the last stage), on every rank of the replica."""
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.layout.last_stage:
            value[0] = unconditional_energy(self.chunks[-1].model, blocks_BT)
        return float(broadcast_from_last_stage(value, self.layout)[0])

    def evaluate(self, blocks_BT: torch.Tensor, level_blocks_BT: torch.Tensor | None) -> dict[str, float]:
        """The held-out loss (and CALM's unconditional level); BrierLM needs generation through
        the pipeline: convert the checkpoint and run calm-eval for it."""
        micro = list(blocks_BT.to(self.device).split(self.cfg.training.micro_batch_size))
        if len(micro) > 1 and micro[-1].shape[0] != micro[0].shape[0]:
            micro = micro[:-1]  # the schedule sends fixed-shape activations
        calm = self.kind is CALM_KIND  # its unconditional level feeds the collapse alarm
        # Own seeded streams, the training ones put back (as the zero3 evaluation does).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            seed_streams(self.cfg.training.seed, self.device)
            values = [self.evaluate_loss(micro)]
            if calm:  # the same figure on every replica: the all-reduce mean below keeps it
                values.append(self.unconditional_energy(level_blocks_BT.to(self.device)))
        values = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.layout.data_parallel > 1:
            dist.all_reduce(values, group=self.dp_group)
        values = (values / self.layout.data_parallel).tolist()
        metrics = {"loss": values[0]}
        if calm:
            metrics.update(uncond=values[1], gap_pct=100 * (values[1] - values[0]) / values[1])
        return metrics

    # -- what the trainer reads ---------------------------------------------------------------
    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm

    # -- checkpoints (called by CheckpointManager inside its atomic protocol) --------------------
    def _local_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer holding this rank's moments (ZeRO-1: of its share of the parameters)."""
        return getattr(self.optimizer, "optim", self.optimizer)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None, save_latest: bool = False):
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        if self.layout.dp_rank == 0:  # the replicas hold identical weights
            weights = {f"chunk{i}": chunk.model.state_dict() for i, chunk in enumerate(self.chunks)}
            torch.save(weights, path / model_file(self.layout))
        # Each rank its own part, no gathering: ZeRO-1's memory saving holds at save time too.
        local = self._local_optimizer()
        moments = {f"chunk{i}": named_moments(local, chunk.model.named_parameters())
                   for i, chunk in enumerate(self.chunks)}
        torch.save({"format": NAMED_MOMENTS, "moments": moments,
                    "lr_groups": [group["name"] for group in self.optimizer.param_groups],
                    "lr_scheduler": self.scheduler.state_dict(), "client_state": client_state or {}},
                   path / optim_file(self.layout))

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True):
        path = (Path(load_dir) / tag).resolve()  # the manager's private view is a symlink: name the real files
        saved = SavedLayout.read(path)
        if saved is None or saved.same_as(self.layout):
            client_state = self._load_own_files(path, load_optimizer_states, load_lr_scheduler_states)
        else:
            client_state = self._load_resharded(path, saved, load_optimizer_states, load_lr_scheduler_states)
        return str(Path(load_dir) / tag), client_state

    def _load_own_files(self, path: Path, load_optimizer_states: bool, load_lr_scheduler_states: bool) -> dict:
        """The same layout: each rank reads the files it wrote."""
        weights = _load(path / model_file(self.layout))
        if len(weights) != len(self.chunks):
            raise ValueError(f"{path} holds {len(weights)} model chunks per rank, this run {len(self.chunks)}")
        for i, chunk in enumerate(self.chunks):
            chunk.model.load_state_dict(weights[f"chunk{i}"], strict=True)
        state = _load(path / optim_file(self.layout))
        if load_optimizer_states:
            local = self._local_optimizer()
            if state.get("format") == NAMED_MOMENTS:
                # The kinds saved by any chunk: a chunk without them while the others have some is an error.
                kinds = {kind for chunk_moments in state["moments"].values() for kind in chunk_moments}
                for i, chunk in enumerate(self.chunks):
                    saved_moments = state["moments"][f"chunk{i}"]
                    restore_moments(local, chunk.model.named_parameters(),
                                    {kind: saved_moments.get(kind, {}) for kind in kinds},
                                    f"{path / optim_file(self.layout)}, chunk{i}")
            else:  # torch's index-keyed state, written before named moments: this layout reads it
                local.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states:
            self._restore_schedule(state["lr_scheduler"])
        return state["client_state"]

    def _load_resharded(self, path: Path, saved: SavedLayout, load_optimizer_states: bool,
                        load_lr_scheduler_states: bool) -> dict:
        """Another TP/PP layout: every rank merges all the saved shards (weights, and moments keyed
        by parameter name) into the full model's and takes its own part, strictly."""
        if self.layout.tp_rank == self.layout.pp_rank == self.layout.dp_rank == 0:
            logger.info("resharding %s, written with %s, for %s", path, describe(saved), describe(self.layout))
        # The one collective first: any error below is then raised alike on every rank, or is its own.
        weight_names, param_names = _union_over_ranks(*self._global_names())
        merged = read_merged(path, saved, with_optimizer=load_optimizer_states or load_lr_scheduler_states)
        check_same_names(f"{path}: weights", weight_names, set(merged.weights))
        for i, chunk in enumerate(self.chunks):
            own = chunk.model.state_dict()
            shard = shard_named(merged.weights, list(own), self._layer_offset(i), self.layout.tp_rank,
                                self.layout.tensor_parallel, f"{path}: weights")
            try:
                chunk.model.load_state_dict({**shard, **extra_state(own)}, strict=True)
            except RuntimeError as err:  # shapes: torch names the key
                raise LayoutChangeError(f"{path}: {err}") from None
        merged.weights = {}  # the full model's weights are no longer needed
        if load_optimizer_states:
            self._restore_resharded_moments(path, merged, param_names)
        if load_lr_scheduler_states:
            self._restore_schedule(_schedule_for_groups(merged, self.optimizer.param_groups, path))
        if merged.lr_scheduler is None:  # no optimizer file read: the step counter from one
            return _load(path / optim_file_name(0, 0, 0))["client_state"]
        return merged.client_state

    def _restore_resharded_moments(self, path: Path, merged: MergedCheckpoint, param_names: set[str]) -> None:
        if not merged.moments:
            logger.info("%s holds no optimizer moments (saved before the first optimizer step)", path)
            return
        check_same_names(f"{path}: optimizer moments", param_names, merged.moment_names())
        local = self._local_optimizer()
        stepped = {id(p) for group in local.param_groups for p in group["params"]}
        for i, chunk in enumerate(self.chunks):
            named = [(name, p) for name, p in chunk.model.named_parameters() if id(p) in stepped]
            moments = {kind: shard_named(values, [name for name, _ in named], self._layer_offset(i),
                                         self.layout.tp_rank, self.layout.tensor_parallel,
                                         f"{path}: optimizer {kind}")
                       for kind, values in merged.moments.items()}
            restore_moments(local, named, moments, f"{path} (resharded), chunk{i}")

    def _restore_schedule(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        # ZeRO-1 copies the wrapper's lrs onto its shard at every step, and the wrapper still
        # holds the schedule's step-0 lrs (0 for a delayed group): set the restored ones.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def _layer_offset(self, vp_stage: int) -> int:
        return layer_offset(self.cfg.model.num_layers, self.layout.pipeline_parallel, self.layout.pp_rank,
                            self.layout.virtual_stages, vp_stage)

    def _global_names(self) -> tuple[set[str], set[str]]:
        """This rank's weights, and the parameters its optimizer steps, by global name."""
        stepped = {id(p) for group in self._local_optimizer().param_groups for p in group["params"]}
        weights, params = set(), set()
        for i, chunk in enumerate(self.chunks):
            offset = self._layer_offset(i)
            weights |= chunk_weight_names(chunk.model.state_dict(), offset)
            params |= {global_key(name, offset) for name, p in chunk.model.named_parameters() if id(p) in stepped}
        return weights, params


def _schedule_for_groups(merged: MergedCheckpoint, groups: list[dict], path: Path) -> dict:
    """The saved LR schedule for this rank's parameter groups, matched by name: a pipeline stage
    may now hold groups (embeddings, head) another stage's file saved."""
    names = [group["name"] for group in groups]
    missing = [name for name in names if name not in merged.lr_groups]
    if missing:
        raise LayoutChangeError(f"{path}: no optimizer file holds the LR schedule of parameter groups {missing}")
    return {**merged.lr_scheduler, "base_lrs": [merged.lr_groups[name][0] for name in names],
            "_last_lr": [merged.lr_groups[name][1] for name in names], "lr_lambdas": [None] * len(names)}


def _union_over_ranks(*name_sets: set[str]) -> tuple[set[str], ...]:
    """Each set united over every rank (all of them together hold the whole model)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return name_sets
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, name_sets)
    return tuple(set().union(*(ranks[i] for ranks in gathered)) for i in range(len(name_sets)))


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the 3d checkpoint is incomplete or from another layout")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_3d_engine(cfg: JobConfig, layout: ParallelLayout, device: torch.device) -> ModelParallelEngine:
    """This rank's model chunks of the configured model (its layers and tensor shards only),
    started from training.init_weights when given, on `device`, in an engine."""
    if cfg.training.precision == "bf16" and device.type != "cuda":
        raise ValueError(
            "training.precision=bf16 in the 3d regime computes under CUDA autocast (megatron's "
            "tensor-parallel layers cast their backward only there): on a CPU use training.precision=fp32"
        )
    virtual = layout.virtual_stages
    chunks = []
    for vp_stage in range(virtual):
        first, last = chunk_place(layout, vp_stage)
        options = BackboneOptions(
            pre_process=first,
            post_process=last,
            recompute=cfg.parallel.activation_recompute,
            sequence_parallel=cfg.parallel.sequence_parallel,
            vp_stage=vp_stage if virtual > 1 else None,
        )
        model = strip_to_stage(build_model(cfg, backbone_options=options), model_kind(cfg.training.stage), first, last)
        model = parallelize_vocabulary(model, layout, first, last)
        if cfg.training.init_weights:
            offset = layer_offset(cfg.model.num_layers, layout.pipeline_parallel, layout.pp_rank, virtual, vp_stage)
            load_initial_weights(model, cfg.training.init_weights, offset, layout.tp_rank, layout.tensor_parallel)
        autocast = torch.bfloat16 if cfg.training.precision == "bf16" else None
        chunks.append(PipelineStage(model.to(device), first, last, cfg.derived.steps_per_block,
                                    vp_stage=vp_stage if virtual > 1 else None, autocast_dtype=autocast))
    return ModelParallelEngine(chunks, cfg, layout)
