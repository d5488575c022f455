"""The training loop: one trainer for the autoencoder, CALM and the token baseline, in either
regime (the engine, `calm_dist.engines`, holds what differs).

Order of work: validate everything that can be checked (config, data, checkpoint compatibility)
before any model is built; build the model with the same seed on every rank, in the regime's
engine; resume; then step, log, evaluate, checkpoint, and stop cleanly on a signal, a wall-clock
budget, too many non-finite losses, or the last step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from calm_dist import __version__
from calm_dist.checkpoint.integrity import NonFiniteState
from calm_dist.checkpoint.manager import CheckpointManager, check_compatible, consolidate_fp32
from calm_dist.checkpoint.stateful import Recorded, Stateful
from calm_dist.config import config_to_dict, rules, save_config
from calm_dist.config.schema import JobConfig
from calm_dist.data.index import check_tokenizer, id_mismatches, load_index
from calm_dist.data.loader import build_train_loader, read_eval_blocks
from calm_dist.data.shards import CorruptShardError, check_shard_sizes, verify_shards
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.engines.build import build_engine
from calm_dist.evaluation.in_training import rank_slice
from calm_dist.flops import compute_precision, peak_tflops, training_flops_per_token
from calm_dist.models.autoencoder_io import save_autoencoder
from calm_dist.models.kinds import AUTOENCODER, model_kind
from calm_dist.parallel.launch import DistInfo
from calm_dist.parallel.state import current_layout, ensure_model_parallel, seed_model_building, seed_training
from calm_dist.training.collapse_alarm import CollapseAlarm
from calm_dist.training.metrics import MetricsLogger
from calm_dist.training.rng import RngStreams
from calm_dist.training.signals import StopRequest
from calm_dist.training.telemetry import GpuTelemetry, memory_stats

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters saved in every checkpoint's metadata."""

    step: int = 0
    tokens: int = 0  # context tokens consumed (global, all ranks)
    vectors: int = 0  # model steps consumed: chunks for CALM and the autoencoder, tokens for the baseline
    skipped_batches: int = 0  # micro-batches skipped for a non-finite loss


class TrainingStopped(RuntimeError):
    """The run stopped early for a reason that needs the user (e.g. diverging loss)."""


def check_data_matches_model(cfg: JobConfig) -> None:
    """The shards' vocabulary and special ids must be the model's; with data.tokenizer pointing
    at a tokenizer file, its fingerprint must be the one the shards were made with."""
    if not cfg.data.train_path:
        raise ValueError("data.train_path is empty: prepare shards with calm-prepare-data and point to them")
    m = cfg.model
    for path in filter(None, (cfg.data.train_path, cfg.data.valid_path)):
        index = load_index(path)
        wrong = [f"model.{name} = {ours} but the shards say {theirs}"
                 for name, theirs, ours in id_mismatches(index.vocab_size, index.bos_id, index.eos_id, index.pad_id, m)]
        if wrong:
            raise ValueError(f"{path}: the shards do not match the model: " + "; ".join(wrong)
                             + " (set these model fields from the shards' tokenizer)")
        if Path(cfg.data.tokenizer).exists() or cfg.data.tokenizer == "gpt2":
            check_tokenizer(index, load_tokenizer(cfg.data.tokenizer))


def check_shard_files(cfg: JobConfig, rank: int, world_size: int) -> None:
    """Every shard present with its indexed size (data.verify=full: also read and checksummed, the
    shards split over the ranks), before any model is built. A damaged training shard is an error
    naming it, or with data.skip_corrupt a warning (it is skipped, and counted, when reached)."""
    for split, path in (("train", cfg.data.train_path), ("valid", cfg.data.valid_path)):
        if not path:
            continue
        index = load_index(path)
        problems = [str(e) for e in check_shard_sizes(index)]
        if cfg.data.verify == "full":
            local = [str(e) for e in verify_shards(index, (rank, world_size))]
            if dist.is_initialized() and world_size > 1:
                parts: list = [None] * world_size
                dist.all_gather_object(parts, local)
                local = [line for part in parts for line in part]
            problems = sorted(set(problems) | set(local))
        if not problems:
            continue
        if split == "train" and cfg.data.skip_corrupt:
            if rank == 0:
                for line in problems:
                    logger.warning("damaged shard, skipped when reached (data.skip_corrupt): %s", line)
            continue
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptShardError(f"{problems[0]}{more}; or set data.skip_corrupt=true to train without the "
                                "damaged training shards")


def checkpoint_meta(cfg: JobConfig, state: TrainState, ds_config: dict | None) -> dict:
    """What every checkpoint's meta.json holds besides the step and the world size (the manager
    adds them): the config (its parallel section and the world size give the layout the converter
    and resharding read: `checkpoint.saved_layout.layout_of`), the counters and the code version."""
    return {
        "config": config_to_dict(cfg),
        "train_state": asdict(state),
        "ds_config": ds_config,
        "code_version": __version__,
    }


class Trainer:
    def __init__(self, cfg: JobConfig, info: DistInfo, start_time: float | None = None):
        self.cfg, self.info = cfg, info
        self.kind = model_kind(cfg.training.stage)
        self.start_time = time.time() if start_time is None else start_time
        self.run_dir = Path(cfg.training.output_dir)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", cfg.training.keep_last, info.rank, info.world_size
        )
        # Everything that can fail on bad input fails here, before a model exists.
        self.resume_tag = (self.checkpoints.resolve_verified(cfg.training.load_step, cfg.training.resume_fallback)
                           if cfg.training.resume else None)
        if self.resume_tag:
            check_compatible(self.checkpoints.read_meta(self.resume_tag)["config"], config_to_dict(cfg))
        elif self.checkpoints.tags():
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints {self.checkpoints.tags()} and training.resume is "
                "off: choose a new training.output_dir (nothing there was touched)"
            )
        check_data_matches_model(cfg)
        check_shard_files(cfg, info.rank, info.world_size)
        par = cfg.parallel
        ensure_model_parallel(par.tensor_parallel, par.pipeline_parallel, cfg.training.seed, par.virtual_pipeline_stages,
                              cfg.training.collective_timeout_minutes)
        # Data and evaluation blocks are split over the data-parallel replicas: the tensor ranks
        # and pipeline stages of one replica read the same batches (zero3: every rank is a replica).
        self.layout = layout = current_layout()
        # The autoencoder reads documents padded to whole chunks (CALM.md §1.3); the language
        # models read documents concatenated (§2.6).
        packing = rules.PACKING_FOR_TRAINING[cfg.training.stage]
        k = cfg.autoencoder.patch_size
        self.loader = build_train_loader(
            cfg.data.train_path,
            block_tokens=cfg.derived.block_tokens,
            micro_batch_size=cfg.training.micro_batch_size,
            rank=layout.dp_rank,
            world_size=layout.data_parallel,
            num_workers=cfg.data.num_workers,
            seed=cfg.data.seed,
            packing=packing,
            patch_size=k,
            resampled=cfg.data.resampled,
            skip_corrupt=cfg.data.skip_corrupt,
            shuffle_blocks=cfg.data.shuffle_blocks,
        )
        self.eval_blocks = self.level_blocks = None
        if cfg.data.valid_path and cfg.training.eval_steps:
            blocks = read_eval_blocks(cfg.data.valid_path, cfg.derived.block_tokens,
                                      max_blocks=cfg.training.eval_steps,
                                      packing=rules.PACKING_FOR_EVALUATION[cfg.training.stage], patch_size=k)
            self.eval_blocks = rank_slice(blocks, layout.dp_rank, layout.data_parallel)
            # CALM's unconditional level is the marginal of ALL the evaluation blocks, on every rank:
            # one figure whatever the number of replicas (a slice can be a single document).
            self.level_blocks = blocks[: blocks.shape[0] // layout.data_parallel * layout.data_parallel]

        seed_model_building(cfg.training.seed, layout)  # identical initial weights on every replica
        self.engine = build_engine(cfg, layout, info.device)
        self.ds_config = self.engine.ds_config
        # From here on every replica draws its own noise (head samples, targets, dropout).
        seed_training(cfg.training.seed, layout)
        self.state = TrainState()
        if self.resume_tag:
            self._resume(self.resume_tag)
        if info.rank == 0:  # only once the resume worked: a refused run leaves the directory as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if self.ds_config is not None:
                (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))

    # -- checkpoints ----------------------------------------------------------------------------
    def _meta(self) -> dict:
        return checkpoint_meta(self.cfg, self.state, self.ds_config)

    def _pieces(self) -> dict[str, Stateful]:
        """What each rank's checkpoint file holds besides the engine's files (the model, the
        optimizer and the LR schedule); the train state is in meta.json."""
        params = list(self.engine.module.parameters())
        return {
            "data": self.loader,
            "rng": RngStreams(),
            # How much of the model this rank holds (under ZeRO-3 about 1/world): for the record.
            "params_local": Recorded(lambda: sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                                 for p in params)),
            "params_total": Recorded(lambda: sum(getattr(p, "ds_numel", p.numel()) for p in params)),
        }

    def save(self) -> str:
        tag = self.checkpoints.save(self.engine, self.state.step, self._meta(), self._pieces())
        logger.info("saved checkpoint %s", tag)
        return tag

    def _resume(self, tag: str) -> None:
        pieces = self._pieces()
        if not self.cfg.training.load_rng:
            del pieces["rng"]
        meta, _ = self.checkpoints.load(self.engine, tag, load_optimizer=self.cfg.training.load_optimizer,
                                        pieces=pieces)
        self.state = TrainState(**meta["train_state"])
        logger.info("resumed from %s at step %d", tag, self.state.step)

    # -- one optimizer step ----------------------------------------------------------------------
    def _count_bad_step(self, bad_in_a_row: int, what: str = "non-finite loss") -> None:
        logger.warning("%s at step %d: skipped (%d in a row)", what, self.state.step + 1, bad_in_a_row)
        if bad_in_a_row >= self.cfg.training.max_bad_steps:
            raise TrainingStopped(
                f"{bad_in_a_row} non-finite losses or gradients in a row at step {self.state.step + 1}: the run is "
                "diverging (lower optimizer.lr, raise optimizer.warmup_steps, or check the data)"
            )

    def _finish_step(self) -> None:
        cfg = self.cfg
        self.state.step += 1
        self.state.tokens += cfg.derived.global_batch_size * cfg.data.seq_length
        self.state.vectors += cfg.derived.global_batch_size * cfg.derived.steps_per_block

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step: the engine's, fed from the loader; skipped micro-batches are
        counted, and too many bad ones in a row stop the run."""
        data_time = 0.0

        def next_batch() -> torch.Tensor:
            nonlocal data_time
            start = time.perf_counter()
            tokens = next(batches).to(self.info.device, non_blocking=True)
            data_time += time.perf_counter() - start
            return tokens

        def on_skip(micro_batches: int, in_a_row: int, what: str) -> None:
            self.state.skipped_batches += micro_batches
            self._count_bad_step(in_a_row, what)

        report = self.engine.train_step(next_batch, on_skip)
        self._finish_step()
        return {**report, "data_ms": 1e3 * data_time}

    def _evaluate(self) -> dict[str, float]:
        return self.engine.evaluate(self.eval_blocks, self.level_blocks)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        cfg, info = self.cfg, self.info
        metrics = MetricsLogger(self.run_dir, cfg.logging, info.rank, info.world_size,
                                cfg.training.train_steps, start_step=self.state.step)
        telemetry = GpuTelemetry()
        if info.rank == 0 and not telemetry.available:
            metrics.note(telemetry.note)
        flops_per_token = training_flops_per_token(cfg)
        device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
        peak = peak_tflops(device_name, compute_precision(cfg.training.precision), cfg.logging.peak_tflops)
        tokens_per_step = cfg.derived.global_batch_size * cfg.data.seq_length
        batches = iter(self.loader)
        last_saved = self.state.step if self.resume_tag else -1
        stop_reason, last_eval = None, -1
        opt = cfg.optimizer
        longest_delay = max(opt.lr_delay_steps.values(), default=0)
        if longest_delay >= cfg.training.train_steps and info.rank == 0:
            metrics.note(f"optimizer.lr_delay_steps holds a module group at LR 0 for {longest_delay} steps, the "
                         f"whole run of {cfg.training.train_steps}: that group never trains")
        alarm = CollapseAlarm(grace_steps=longest_delay + opt.warmup_steps)
        # The budget counts from process start: model build and resume count against it too.
        with StopRequest(cfg.training.wall_clock_minutes, start_time=self.start_time) as stop:
            window_start, window_steps = time.perf_counter(), 0
            while self.state.step < cfg.training.train_steps:
                try:
                    step_metrics = self.train_step(batches)
                except TrainingStopped as stopped:
                    try:
                        saved = self.save()
                    except NonFiniteState as refused:  # the weights are gone too: keep the good ones
                        raise TrainingStopped(f"{stopped}; {refused}") from None
                    raise TrainingStopped(f"{stopped}; the weights of step {self.state.step} are "
                                          f"checkpointed in {saved}") from None
                window_steps += 1
                step = self.state.step
                if step % cfg.logging.log_interval == 0 or step == cfg.training.train_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * tokens_per_step / elapsed
                    step_metrics["tok_per_s"] = tokens_per_s
                    step_metrics["vec_per_s"] = tokens_per_s * cfg.derived.steps_per_block / cfg.data.seq_length
                    tflops = flops_per_token * tokens_per_s / info.world_size / 1e12
                    step_metrics["tflops"] = tflops
                    if peak:
                        step_metrics["mfu"] = 100 * tflops / peak
                    step_metrics.update(memory_stats(info.device))
                    step_metrics.update(telemetry.sample(info.local_rank) if telemetry.available else {})
                    metrics.log_train(step, step_metrics)
                    self._warn(metrics, alarm.on_train(step, step_metrics))
                    window_start, window_steps = time.perf_counter(), 0
                if self.eval_blocks is not None and step % cfg.training.eval_interval == 0:
                    self.final_eval = self._evaluate()
                    metrics.log_eval(step, self.final_eval)
                    self._warn(metrics, alarm.on_eval(step, self.final_eval))
                    last_eval = step
                stop_reason = stop.agreed_reason()
                if stop_reason or step % cfg.training.save_interval == 0:
                    self.save()
                    last_saved = step
                if stop_reason:
                    metrics.note(f"stopping at step {step}: {stop_reason}; checkpoint saved, resume by rerunning")
                    break
            # Still inside the handlers: a signal now only sets the flag, it cannot kill the export.
            if last_saved != self.state.step:
                self.save()
            finished = self.state.step >= cfg.training.train_steps
            if self.kind is AUTOENCODER and finished:
                self.export_autoencoder()  # whatever stopped the loop at the last step
            if self.eval_blocks is not None and finished and last_eval != self.state.step:
                self.final_eval = self._evaluate()
                metrics.log_eval(self.state.step, self.final_eval)
                self._warn(metrics, alarm.on_eval(self.state.step, self.final_eval))
        metrics.close()
        telemetry.close()
        return self.state

    def _warn(self, metrics, warning: str | None) -> None:
        if warning and self.info.rank == 0:
            logger.warning(warning)
            metrics.note(warning)

    def export_autoencoder(self) -> Path | None:
        """Consolidate the final checkpoint's fp32 weights into <output_dir>/autoencoder."""
        target = self.run_dir / "autoencoder"
        if self.info.rank == 0:
            tag = self.checkpoints.resolve(-1)
            state_dict = consolidate_fp32(self.checkpoints.save_dir, tag)
            save_autoencoder(state_dict, self.cfg.autoencoder, target)
            logger.info("autoencoder exported to %s", target)
        if dist.is_initialized():
            dist.barrier()
        return target

