"""Crash-safe DeepSpeed checkpoints with our metadata and per-rank resume state.

Layout of `save_dir` (DeepSpeed's own, so its tools keep working):

    latest                    "global_stepN": the checkpoint to resume from
    zero_to_fp32.py           DeepSpeed's offline consolidation script (copied by DeepSpeed)
    global_stepN/
        zero_pp_rank_R_mp_rank_00_model_states.pt    DeepSpeed, one per data-parallel rank
        zero_pp_rank_R_mp_rank_00_optim_states.pt    (stage <= 2: mp_rank_00_model_states.pt)
        rank_00000.pt ...     ours: each rank's resume state (data position, RNG), weights_only-loadable
        meta.json             ours: step, world size and the trainer's metadata (config, counters, ...)

Atomicity (a process killed at any moment leaves the previous checkpoint usable):
1. every rank writes into `global_stepN.partial/` (DeepSpeed files, then its rank file via a temp
   name and `os.replace`); a barrier;
2. rank 0 writes `meta.json` (temp + replace), renames the directory to `global_stepN` and then
   replaces `latest` (temp + replace); a barrier.
So a `global_stepN` directory is always complete, and `latest` only ever names a complete one.
Leftover `*.partial` (and `*.stale`, directories being deleted) are removed when a manager starts.
The guarantee is against dying processes on a shared filesystem; it assumes DeepSpeed's default,
synchronous checkpoint engine (a decoupled one is refused).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from calm_dist.config import flatten_config

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
PARTIAL = ".partial"  # suffix of a directory being written
STALE = ".stale"  # suffix of a directory being deleted
RETIRED = ".retired"  # suffix of a complete checkpoint replaced by a re-save of its step
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


class CheckpointMismatch(ValueError):
    """The checkpoint was written with a configuration these weights cannot be loaded into."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


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

    def read_meta(self, tag: str) -> dict:
        path = self.save_dir / tag / META
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {tag} is not a complete checkpoint")
        return json.loads(path.read_text())

    # ---- saving --------------------------------------------------------------------------------

    def save(self, engine, step: int, meta: dict, rank_state: dict) -> str:
        """Write checkpoint `global_step{step}` atomically; a collective (every rank calls it).

        `meta` must be JSON-serialisable (rank 0's copy is written); `rank_state` holds tensors and
        plain containers only (read back with `weights_only=True`). Returns the checkpoint's path.
        """
        if engine.checkpoint_engine.is_decoupled():
            raise ValueError("a decoupled (asynchronous) DeepSpeed checkpoint engine breaks atomic saves")
        started = time.perf_counter()
        tag = tag_for(step)
        partial = self.save_dir / (tag + PARTIAL)
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            _remove_dir(partial)  # left by an earlier failed save of this step in this process
        _barrier()

        engine.save_checkpoint(str(self.save_dir), tag=partial.name, client_state={"step": step}, save_latest=False)
        _write_atomic(partial / rank_file(self.rank), lambda f: torch.save(rank_state, f))
        _barrier()  # every rank's files are on disk

        if self.rank == 0:
            full_meta = {**meta, "step": step, "world_size": self.world_size}
            _write_atomic(partial / META, lambda f: f.write(json.dumps(full_meta, indent=2).encode()))
            if self._before_commit is not None:
                self._before_commit()
            self._commit(partial, self.save_dir / tag)
            self._prune(keep=tag)
        _barrier()
        if self.rank == 0:
            logger.info("saved checkpoint %s in %.1f s", self.save_dir / tag, time.perf_counter() - started)
        return str(self.save_dir / tag)

    def _commit(self, partial: Path, final: Path) -> None:
        stale = None
        if final.exists():  # a re-save of the same step: retire the old one only now
            stale = final.with_name(final.name + RETIRED)
            _remove_dir(stale)
            os.rename(final, stale)
        os.rename(partial, final)
        _fsync_dir(self.save_dir)
        _write_atomic(self.save_dir / LATEST, lambda f: f.write(final.name.encode()))
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
            elif entry.is_dir() and entry.name.endswith((PARTIAL, STALE, RETIRED)):
                logger.warning("removing %s, left by an interrupted save", entry)
                _remove_dir(entry)
            elif entry.is_file() and entry.name.startswith(LATEST + ".tmp"):
                entry.unlink()

    def _read_latest(self) -> str | None:
        path = self.save_dir / LATEST
        return path.read_text().strip() if path.is_file() else None

    # ---- loading -------------------------------------------------------------------------------

    def load(self, engine, tag: str, load_optimizer: bool = True) -> tuple[dict, dict]:
        """Load `tag` into a freshly built engine; returns (meta, this rank's rank_state).

        A collective. `load_optimizer=False` loads the weights only (no optimizer or LR-schedule
        state). Under ZeRO-3 a DeepSpeed engine cannot load right after it saved: build a new one.
        """
        path = self.save_dir / tag
        meta = self.read_meta(tag)
        rank_files = len(list(path.glob("rank_*.pt")))
        saved_world = meta.get("world_size", rank_files)
        if saved_world != self.world_size:
            raise ValueError(
                f"{path} was written by {saved_world} ranks ({rank_files} rank files), but this run has "
                f"world size {self.world_size}; ZeRO partitions cannot be resharded on load. Resume with "
                f"{saved_world} ranks, or consolidate the weights (consolidate_fp32) and start a new run."
            )
        rank_state = self._read_rank_state(path / rank_file(self.rank))

        if load_optimizer:
            check_optimizer_groups(meta.get("config", {}), path)
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
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path} (see its log above)")
        if self.rank == 0:
            logger.info("loaded checkpoint %s (optimizer state: %s)", path, "yes" if load_optimizer else "no")
        return meta, rank_state

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


# ---- compatibility and export -----------------------------------------------------------------


def check_compatible(saved_config: dict, current_config: dict) -> None:
    """Raise CheckpointMismatch naming every field that makes the saved weights or optimizer state
    unusable in the current run (the model and autoencoder sections, stage and parallel layout).
    Other fields (learning rate, step counts, logging) may change between runs."""
    saved, current = flatten_config(saved_config), flatten_config(current_config)
    names = sorted(
        name
        for name in saved.keys() | current.keys()
        if name.split(".")[0] in INCOMPATIBLE_SECTIONS or name in INCOMPATIBLE_FIELDS
    )
    missing = "<absent>"
    differing = [
        f"  {name}: saved {saved.get(name, missing)!r}, current {current.get(name, missing)!r}"
        for name in names
        if saved.get(name, missing) != current.get(name, missing)
    ]
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


def consolidate_fp32(save_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a ZeRO checkpoint, keyed like the module's state_dict (offline, CPU)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(save_dir) / tag
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)


# ---- filesystem and collective helpers --------------------------------------------------------


def _write_atomic(path: Path, write: Callable) -> None:
    """Write via a temp file in the same directory, flushed to disk, then `os.replace`."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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
