"""Crash-safe DeepSpeed checkpoints with our metadata and per-rank resume state.

Layout of `save_dir` (DeepSpeed's own, so its tools keep working):

    latest                    "global_stepN": the checkpoint to resume from
    zero_to_fp32.py           DeepSpeed's offline consolidation script (copied by DeepSpeed)
    global_stepN/
        zero_pp_rank_R_mp_rank_00_model_states.pt    DeepSpeed, one per data-parallel rank
        zero_pp_rank_R_mp_rank_00_optim_states.pt    (stage <= 2: mp_rank_00_model_states.pt)
        rank_00000.pt ...     ours: each rank's resume state (data position, RNG), weights_only-loadable
        meta.json             ours: step, world size and the trainer's metadata (config, counters, ...)
        manifest.json         ours: size and sha256 of every other file (checkpoint_integrity.py)
    global_stepM.damaged      a checkpoint that failed verification, renamed aside (never deleted)

Atomicity (a process killed at any moment leaves the previous checkpoint usable):
1. every rank writes into `global_stepN.partial/` (DeepSpeed files, then its rank file via a temp
   name and `os.replace`); a barrier;
2. rank 0 writes `meta.json` (temp + replace); every rank hashes a share of the files and rank 0
   writes `manifest.json`, renames the directory to `global_stepN` and then replaces `latest`
   (temp + replace); a barrier.
So a `global_stepN` directory is always complete, and `latest` only ever names a complete one.
Before anything is written, weights and optimizer states are checked finite (a non-finite state
is never saved, so it can neither become `latest` nor prune a good checkpoint) and, from the size
of the previous checkpoint, that the filesystem has room. A save that fails anyway removes its
`.partial` and says why in one line; the previous checkpoint and `latest` are untouched.
Resuming verifies the checkpoint against its manifest first; a damaged one is renamed aside and
the newest one that verifies is used instead (`training.resume_fallback`).
Leftover `*.partial` (and `*.stale`, directories being deleted) are removed when a manager starts.
The guarantee is against dying processes on a shared filesystem; it assumes DeepSpeed's default,
synchronous checkpoint engine (the zero3 engine refuses a decoupled one when it is built).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from calm_dist.common.atomic import TEMP_MARK, atomic_write, atomic_write_bytes, fsync_dir
from calm_dist.config import flatten_config
from calm_dist.checkpoint.integrity import (
    MANIFEST_VERSION,
    META,
    CheckpointDamaged,
    NonFiniteState,
    checkpoint_bytes,
    from_rank0,
    global_non_finite,
    verify_checkpoint,
    write_manifest,
)
from calm_dist.checkpoint.reshard import LayoutChangeError, SavedLayout, continued_rank_state, source_rank
from calm_dist.checkpoint.stateful import Stateful, restore, states_of
from calm_dist.parallel.state import ParallelLayout

logger = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL = ".partial"  # suffix of a directory being written
STALE = ".stale"  # suffix of a directory being deleted
RETIRED = ".retired"  # suffix of a complete checkpoint replaced by a re-save of its step
DAMAGED = ".damaged"  # suffix of a checkpoint that failed verification, kept for inspection
_TAG = re.compile(r"^global_step(\d+)$")

# Fields whose change makes saved weights or optimizer state unusable (dotted config names).
INCOMPATIBLE_SECTIONS = ("model", "autoencoder")
INCOMPATIBLE_FIELDS = (
    "training.stage",
    "parallel.regime",
    "parallel.tensor_parallel",
    "parallel.pipeline_parallel",
    "parallel.zero_stage",
)
# Within the 3d regime the engine reshards weights and moments for another TP/PP layout
# (calm_dist/checkpoint/reshard.py), but each replica's data position is its own: DP must stay.
RESHARDABLE_IN_3D = ("parallel.tensor_parallel", "parallel.pipeline_parallel")
DATA_PARALLEL_SIZE = "derived.data_parallel_size"
# What ZeRO-3 tiles its optimizer state in when a DeepSpeed config does not say.
DEEPSPEED_DEFAULT_SUB_GROUP_SIZE = 1_000_000_000


class CheckpointMismatch(ValueError):
    """The checkpoint was written with a configuration these weights cannot be loaded into."""


class CheckpointSaveError(RuntimeError):
    """A save could not be completed (disk full, unwritable directory, ...); nothing was lost."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class CheckpointManager:
    """Saves, finds and loads checkpoints in `save_dir`; every rank makes one with the same arguments.

    `keep_last` complete checkpoints are kept (<= 0: all). `before_commit`, a test hook, runs on rank
    0 after every file of a save is written and before the save is made visible (the rename).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        keep_last: int,
        rank: int,
        world_size: int,
        before_commit: Callable[[], None] | None = None,
    ):
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self._before_commit = before_commit
        if rank == 0 and self.save_dir.is_dir():
            self._remove_leftovers()
        _barrier()  # every rank then lists the same checkpoints

    # ---- finding -------------------------------------------------------------------------------

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest step first."""
        if not self.save_dir.is_dir():
            return []
        found = [
            (int(match.group(1)), entry.name)
            for entry in self.save_dir.iterdir()
            if (match := _TAG.match(entry.name)) and (entry / META).is_file()
        ]
        return [name for _, name in sorted(found)]

    def resolve(self, load_step: int = -1) -> str | None:
        """The tag to load: -1 the one `latest` names (else the newest complete one; None if there
        is none), N exactly `global_stepN` (else FileNotFoundError listing the available steps)."""
        tags = self.tags()
        if load_step >= 0:
            if tag_for(load_step) in tags:
                return tag_for(load_step)
            steps = [int(_TAG.match(t).group(1)) for t in tags]
            raise FileNotFoundError(
                f"no complete checkpoint for step {load_step} in {self.save_dir}; "
                f"available steps: {steps or 'none'}"
            )
        if not tags:
            return None
        latest = self._read_latest()
        if latest in tags:
            return latest
        logger.warning(
            "%s: '%s' names %r, not a complete checkpoint; using the newest complete one, %s",
            self.save_dir, LATEST, latest, tags[-1],
        )  # fmt: skip
        return tags[-1]

    def resolve_verified(self, load_step: int = -1, fallback: bool = True) -> str | None:
        """`resolve`, then the checkpoint verified against its manifest (a collective; rank 0
        decides which checkpoint, every rank shares the checking). A damaged one is renamed aside to
        `<tag>.damaged` and, with `fallback` and no explicit `load_step`, the newest older one that
        verifies is used instead, saying loudly which and why; `latest` then names it. Without
        `fallback` (or for an explicit step) a damaged checkpoint is an error naming the file."""
        tag, error = from_rank0(self._resolve_on_rank0(load_step) if self.rank == 0 else None)
        if error:
            raise error
        set_aside = False
        while tag is not None:
            try:
                if not verify_checkpoint(self.save_dir / tag):
                    if self.rank == 0:
                        logger.warning("%s has no manifest (written by an older calm-dist): loading it unverified",
                                       self.save_dir / tag)
                if set_aside and self.rank == 0:
                    atomic_write_bytes(self.save_dir / LATEST, tag.encode())
                return tag
            except CheckpointDamaged as damage:
                if not fallback or load_step >= 0:
                    how = ("choose another training.load_step" if load_step >= 0 else
                           "resume from an older checkpoint with training.load_step=N, or set "
                           "training.resume_fallback=true to do so automatically")
                    raise CheckpointDamaged(f"{damage}. {how}") from damage
                aside = self.quarantine(tag)
                set_aside = True
                older = [t for t in self.tags() if _step_of(t) < _step_of(tag)]
                if self.rank == 0:
                    logger.error("CHECKPOINT DAMAGED: %s; renamed it to %s (kept for inspection) and resuming "
                                 "from %s instead", damage, aside, older[-1] if older else "nothing")
                if not older:
                    raise CheckpointDamaged(
                        f"{damage}; no older checkpoint in {self.save_dir} to fall back to (the damaged one "
                        f"is kept as {aside}): start a new run in another training.output_dir"
                    ) from damage
                tag = older[-1]
        return None

    def _resolve_on_rank0(self, load_step: int) -> tuple[str | None, Exception | None]:
        """(tag, None), or (None, the error to raise on every rank)."""
        try:
            tag = self.resolve(load_step)
        except FileNotFoundError as err:
            return None, err
        damaged = sorted(p.name for p in self.save_dir.glob(f"*{DAMAGED}*")) if self.save_dir.is_dir() else []
        if tag is None and damaged:
            # Every checkpoint was set aside: starting again from step 0 here would mix two runs.
            return None, CheckpointDamaged(
                f"{self.save_dir} holds only damaged checkpoints ({', '.join(damaged)}); nothing to resume. "
                "Start a new run in another training.output_dir, or restore an intact checkpoint"
            )
        return tag, None

    def quarantine(self, tag: str) -> Path:
        """Rename a damaged checkpoint aside (rank 0; a collective). The files are kept, never
        deleted."""
        aside = None
        if self.rank == 0:
            aside, number = self.save_dir / (tag + DAMAGED), 1
            while aside.exists():
                number += 1
                aside = self.save_dir / f"{tag}{DAMAGED}{number}"
            os.rename(self.save_dir / tag, aside)
        return from_rank0(aside)  # also the barrier: the rename is done

    def read_meta(self, tag: str) -> dict:
        path = self.save_dir / tag / META
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {tag} is not a complete checkpoint")
        return json.loads(path.read_text())

    # ---- saving --------------------------------------------------------------------------------

    def save(self, engine, step: int, meta: dict, pieces: Mapping[str, Stateful]) -> str:
        """Write checkpoint `global_step{step}` atomically; a collective (every rank calls it).

        `meta` must be JSON-serialisable (rank 0's copy is written); the `pieces`' state dicts
        (this rank's file) hold tensors and plain containers only (read back with
        `weights_only=True`). Returns the checkpoint's path.
        Raises NonFiniteState (nothing written) when weights or optimizer states are not finite,
        CheckpointSaveError when the files cannot be written (the partial save removed).
        """
        started = time.perf_counter()
        tag = tag_for(step)
        partial = self.save_dir / (tag + PARTIAL)
        rank_state = states_of(pieces)
        self._check_finite(engine, step)
        self._check_room(tag)
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            _remove_dir(partial)  # left by an earlier failed save of this step in this process
        _barrier()

        try:
            engine.save_checkpoint(str(self.save_dir), tag=partial.name, client_state={"step": step}, save_latest=False)
            atomic_write(partial / rank_file(self.rank), lambda f: torch.save(rank_state, f))
        except Exception as exc:
            # Fail fast, without a collective: the other ranks may be inside one of DeepSpeed's,
            # and the launcher ends them when this process exits.
            raise self._save_failed(tag, partial, exc) from exc
        try:
            _barrier()  # every rank's files are on disk
            if self.rank == 0:
                full_meta = {**meta, "step": step, "world_size": self.world_size, "manifest": MANIFEST_VERSION}
                atomic_write_bytes(partial / META, json.dumps(full_meta, indent=2).encode())
            _barrier()
            write_manifest(partial, atomic_write_bytes)
        except Exception as exc:  # here a peer that failed shows as a collective's error
            raise self._save_failed(tag, partial, exc, peer=not isinstance(exc, OSError)) from exc
        try:
            if self.rank == 0:
                if self._before_commit is not None:
                    self._before_commit()
                self._commit(partial, self.save_dir / tag)
                self._prune(keep=tag)
            _barrier()
        except Exception as exc:  # rank 0: e.g. `latest` unwritable; the others: rank 0 is gone
            raise self._save_failed(tag, partial, exc, peer=self.rank != 0 and not isinstance(exc, OSError)) from exc
        if self.rank == 0:
            logger.info("saved checkpoint %s in %.1f s", self.save_dir / tag, time.perf_counter() - started)
        return str(self.save_dir / tag)

    def _last_good(self) -> str:
        tags = self.tags()
        return f"{self.save_dir / tags[-1]}" if tags else f"none yet in {self.save_dir}"

    def _check_finite(self, engine, step: int) -> None:
        """Refuse (on every rank) to save weights or optimizer moments that hold NaN or inf."""
        bad = global_non_finite(engine)
        if bad["weights"] or bad["optimizer"]:
            raise NonFiniteState(
                f"not saving step {step}: {bad['weights']} non-finite weights and {bad['optimizer']} non-finite "
                f"optimizer-state values (the run diverged or its state was damaged). The last good checkpoint "
                f"is {self._last_good()} (nothing was deleted); resume from it, e.g. with a lower optimizer.lr"
            )

    def _check_room(self, tag: str) -> None:
        """Refuse (on every rank, before writing) a save the filesystem has no room for, judged from
        the size of the newest checkpoint (the first save has none to judge from)."""
        message = None
        tags = self.tags()
        if self.rank == 0 and tags and self.save_dir.is_dir():
            needed = checkpoint_bytes(self.save_dir / tags[-1])
            free = shutil.disk_usage(self.save_dir).free
            if needed is not None and free < needed * 1.05 + (1 << 20):
                message = (
                    f"cannot save {tag} in {self.save_dir}: it needs about {_mb(needed)} (the size of {tags[-1]}) "
                    f"and {_mb(free)} are free on that filesystem. Nothing was written; {tags[-1]} and "
                    f"'{LATEST}' are untouched. Free space (or lower training.keep_last), then rerun: the run "
                    f"resumes from {tags[-1]}"
                )
        message = from_rank0(message)
        if message:
            raise CheckpointSaveError(message)

    def _save_failed(self, tag: str, partial: Path, exc: Exception, peer: bool = False) -> CheckpointSaveError:
        """One clear line for a failed save (cause, path, free space); the partial save removed.
        `peer`: the error came from a collective, i.e. most likely another rank failed."""
        usage = shutil.disk_usage(self.save_dir) if self.save_dir.is_dir() else None
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC or (
            usage is not None and usage.free < max(1 << 20, usage.total // 100))
        if peer:
            cause = f"another rank stopped during the save (its own line says why; here: {type(exc).__name__})"
        else:
            cause = "no space left on the device" if full else f"{type(exc).__name__}: {exc}"
        free = f"{_mb(usage.free)} free" if usage is not None else "free space unknown"
        if not peer:  # its bytes would keep the disk full; a peer leaves it to the failing rank (or
            shutil.rmtree(partial, ignore_errors=True)  # the next start): rank 0 may be renaming it
        return CheckpointSaveError(
            f"saving {tag} in {self.save_dir} failed on rank {self.rank}: {cause} ({free} on that filesystem). "
            f"The previous checkpoint ({self._last_good()}) and '{LATEST}' are untouched; fix the cause, "
            "then rerun to resume from it"
        )

    def _commit(self, partial: Path, final: Path) -> None:
        stale = None
        if final.exists():  # a re-save of the same step: retire the old one only now
            stale = final.with_name(final.name + RETIRED)
            _remove_dir(stale)
            os.rename(final, stale)
        os.rename(partial, final)
        fsync_dir(self.save_dir)
        atomic_write_bytes(self.save_dir / LATEST, final.name.encode())
        if stale is not None:
            _remove_dir(stale)

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        others = [t for t in self.tags() if t != keep]
        for tag in others[: max(0, len(others) - (self.keep_last - 1))]:
            logger.info("removing old checkpoint %s (keep_last=%d)", tag, self.keep_last)
            stale = self.save_dir / (tag + STALE)
            os.rename(self.save_dir / tag, stale)  # never visible half-deleted
            _remove_dir(stale)

    def _remove_leftovers(self) -> None:
        for entry in self.save_dir.iterdir():
            retired = entry.is_dir() and entry.name.endswith(RETIRED)
            complete = self.save_dir / entry.name[: -len(RETIRED)] if retired else None
            if retired and not complete.exists():
                # A crash between retiring a re-saved step and committing its replacement: the
                # retired copy is complete and the only one, so it comes back.
                logger.warning("restoring %s, retired by an interrupted re-save", complete.name)
                os.rename(entry, complete)
            elif entry.is_dir() and entry.name.endswith((PARTIAL, STALE, RETIRED)) and DAMAGED not in entry.name:
                logger.warning("removing %s, left by an interrupted save", entry)
                _remove_dir(entry)
            elif entry.is_file() and entry.name.startswith(LATEST + TEMP_MARK):
                entry.unlink()

    def _read_latest(self) -> str | None:
        path = self.save_dir / LATEST
        return path.read_text().strip() if path.is_file() else None

    # ---- loading -------------------------------------------------------------------------------

    def load(self, engine, tag: str, load_optimizer: bool = True, *,
             pieces: Mapping[str, Stateful] | None = None) -> tuple[dict, dict]:
        """Load `tag` into a freshly built engine and its state into each of `pieces`; returns
        (meta, this rank's saved states by piece name).

        A collective. `load_optimizer=False` loads the weights only (no optimizer or LR-schedule
        state). Under ZeRO-3 a DeepSpeed engine cannot load right after it saved: build a new one.
        A 3d checkpoint also loads under another TP/PP layout (the engine reshards it); each rank
        then continues the data position and RNG streams of the saved rank in its place.
        """
        path = self.save_dir / tag
        meta = self.read_meta(tag)
        model_parallel = _model_parallel_resume(engine, meta)
        source = source_rank(*model_parallel) if model_parallel else self._own_rank(meta, path)
        rank_state = self._read_rank_state(path / rank_file(source))
        if model_parallel:
            rank_state = continued_rank_state(rank_state, *model_parallel)

        if load_optimizer:
            check_optimizer_groups(meta.get("config", {}), path)
            check_optimizer_tiling(meta.get("ds_config"), getattr(engine, "ds_config", None), path)
        try:
            loaded = self._load_engine(engine, path, tag, load_optimizer)
        except (CheckpointMismatch, LayoutChangeError, FileNotFoundError):
            raise
        except Exception as exc:  # a damaged file a manifest did not cover (an older checkpoint)
            raise CheckpointDamaged(f"{path} could not be loaded on rank {self.rank} "
                                    f"({type(exc).__name__}: {exc}): the checkpoint is damaged") from exc
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path} (see its log above)")
        restore(pieces or {}, rank_state, str(path / rank_file(source)))
        if self.rank == 0:
            logger.info("loaded checkpoint %s (optimizer state: %s)", path, "yes" if load_optimizer else "no")
        return meta, rank_state

    def _load_engine(self, engine, path: Path, tag: str, load_optimizer: bool):
        if load_optimizer:
            loaded, _ = engine.load_checkpoint(str(self.save_dir), tag=tag)
        else:
            # DeepSpeed 0.19.8 under ZeRO-3 without optimizer states reads the weights of the
            # checkpoint `latest` names, whatever `tag` says; a private view makes them agree.
            with tempfile.TemporaryDirectory(prefix="calm-ckpt-view-") as view:
                os.symlink(path.resolve(), os.path.join(view, tag))
                Path(view, LATEST).write_text(tag)
                loaded, _ = engine.load_checkpoint(
                    view, tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
                )
        return loaded

    def _own_rank(self, meta: dict, path: Path) -> int:
        """This rank, whose own rank file it reads: the world size must be the saved one."""
        rank_files = len(list(path.glob("rank_*.pt")))
        saved_world = meta.get("world_size", rank_files)
        if saved_world != self.world_size:
            raise ValueError(
                f"{path} was written by {saved_world} ranks ({rank_files} rank files), but this run has "
                f"world size {self.world_size}; ZeRO partitions cannot be resharded on load. Resume with "
                f"{saved_world} ranks, or consolidate the weights (consolidate_fp32) and start a new run."
            )
        return self.rank

    def _read_rank_state(self, path: Path) -> dict:
        error = None
        try:
            rank_state = torch.load(path, weights_only=True)
        except FileNotFoundError:
            error = FileNotFoundError(f"rank file {path} is missing: the checkpoint is incomplete")
        except Exception as exc:  # truncated or corrupt: torch raises several types
            error = ValueError(f"rank file {path} is truncated or corrupt ({type(exc).__name__}: {exc})")
        # Fail on every rank together, not only on the one with the bad file.
        if not _all_ranks_ok(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"{path.parent}: another rank could not read its rank file (see its log)")
        return rank_state


def _model_parallel_resume(engine, meta: dict) -> tuple[SavedLayout, ParallelLayout] | None:
    """(saved layout, this rank's layout) when a 3d checkpoint loads into a 3d engine, which may
    have another TP/PP layout: each rank then reads the rank file of the saved rank in its place."""
    saved, layout = SavedLayout.from_meta(meta), getattr(engine, "layout", None)
    return (saved, layout) if saved is not None and isinstance(layout, ParallelLayout) else None


# ---- compatibility and export -----------------------------------------------------------------


def check_compatible(saved_config: dict, current_config: dict) -> None:
    """Raise CheckpointMismatch naming every field that makes the saved weights or optimizer state
    unusable in the current run (the model and autoencoder sections, stage and parallel layout).
    Other fields (learning rate, step counts, logging) may change between runs, and within the 3d
    regime so may tensor_parallel and pipeline_parallel (the data-parallel size may not)."""
    saved, current = flatten_config(saved_config), flatten_config(current_config)
    within_3d = saved.get("parallel.regime") == current.get("parallel.regime") == "3d"
    names = sorted(
        name
        for name in saved.keys() | current.keys()
        if (name.split(".")[0] in INCOMPATIBLE_SECTIONS or name in INCOMPATIBLE_FIELDS)
        and not (within_3d and name in RESHARDABLE_IN_3D)
    )
    missing = "<absent>"
    differing = [
        f"  {name}: saved {saved.get(name, missing)!r}, current {current.get(name, missing)!r}"
        for name in names
        if saved.get(name, missing) != current.get(name, missing)
    ]
    replicas = saved.get(DATA_PARALLEL_SIZE), current.get(DATA_PARALLEL_SIZE)
    if within_3d and None not in replicas and replicas[0] != replicas[1]:
        differing.append(
            f"  {DATA_PARALLEL_SIZE}: saved {replicas[0]!r}, current {replicas[1]!r} (tensor and pipeline "
            "parallelism may change on resume, the data-parallel size may not: each replica's data position "
            f"is saved on its own; run with world size = tensor_parallel x pipeline_parallel x {replicas[0]})"
        )
    if differing:
        raise CheckpointMismatch(
            "the checkpoint was written with a configuration it cannot be loaded into:\n"
            + "\n".join(differing)
            + "\nRevert these fields to resume, or set a new training.output_dir to start a new run."
        )


def check_optimizer_groups(saved_config: dict, path: Path) -> None:
    """Refuse optimizer state written before per-module parameter groups (calm_dist/optim.py).

    Such a checkpoint holds 2 groups (decay, no decay), this code one or two per module group, and
    neither DeepSpeed nor torch can map the old moments onto them. It is recognised by its config,
    which lacks `optimizer.lr_multipliers` (newer ones always have it, empty by default). Newer
    checkpoints load: the groups depend on the model only, not on the multiplier or delay values."""
    if "lr_multipliers" not in saved_config.get("optimizer", {"lr_multipliers": None}):
        raise CheckpointMismatch(
            f"{path}: its optimizer state has the 2 parameter groups (decay, no decay) of calm-dist "
            "before per-module optimizer groups, which this version cannot load. Resume with "
            "training.load_optimizer=false: the weights, step and data position load, AdamW's moments "
            "and the LR schedule start afresh (warmup again)."
        )


def _sub_group_size(ds_config: dict) -> int:
    return int(ds_config["zero_optimization"].get("sub_group_size", DEEPSPEED_DEFAULT_SUB_GROUP_SIZE))


def check_optimizer_tiling(saved_ds_config: dict | None, current_ds_config: dict | None, path: Path) -> None:
    """Refuse ZeRO-3 optimizer state tiled in other sub-groups than this run's, before DeepSpeed
    fails on it with an error that would read as a damaged checkpoint. (calm-dist CPU runs use
    4M-element sub-groups since they were found to speed up the step; older ones used DeepSpeed's
    default.) The weights load whatever the tiling."""
    if not saved_ds_config or not current_ds_config:
        return
    stages = {c.get("zero_optimization", {}).get("stage") for c in (saved_ds_config, current_ds_config)}
    if stages != {3}:
        return
    saved, current = _sub_group_size(saved_ds_config), _sub_group_size(current_ds_config)
    if saved != current:
        raise CheckpointMismatch(
            f"{path}: its ZeRO-3 optimizer state is tiled in sub-groups of {saved:,} elements, this run's in "
            f"{current:,}, and DeepSpeed cannot load one into the other. Either give parallel.ds_preset a "
            f"preset (a .json path) whose zero_optimization sets \"sub_group_size\": {saved}, or resume with "
            "training.load_optimizer=false (weights, step and data position load; AdamW's moments and the LR "
            "schedule start afresh)."
        )


def consolidate_fp32(save_dir: str | os.PathLike, tag: str, lazy: bool = False) -> dict:
    """The full fp32 weights of a ZeRO checkpoint, keyed like the module's state_dict (offline, CPU),
    through DeepSpeed's `zero_to_fp32`. `lazy`: each value is an object whose `.contiguous()` is the
    tensor, gathered on demand from memory-mapped optimizer shards (the converter's way)."""
    # lazy: deepspeed costs ~0.5 s over torch and logs on import; only consolidation needs it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(save_dir) / tag
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag, lazy_mode=lazy)


# ---- filesystem and collective helpers --------------------------------------------------------


def _remove_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_ranks_ok(ok: bool) -> bool:
    if not _distributed():
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
