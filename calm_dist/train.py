"""Train the autoencoder, CALM or the token baseline on DeepSpeed.

    python -m calm_dist.train --config tiny_calm [--config site.yaml] [section.key=value ...]
    torchrun --nproc_per_node 8 -m calm_dist.train --config calm_m data.train_path=...
    deepspeed --num_gpus 8 -m calm_dist.train --config calm_m ...

`--dry-run` validates the config for the launcher's world size and prints it with the merged
DeepSpeed config, without building anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from calm_dist.checkpoint.manager import CheckpointSaveError, NonFiniteState
from calm_dist.common.dist_env import read_dist_env
from calm_dist.common.job_log import setup_job_logging, short_hostname
from calm_dist.config import ConfigError, config_to_dict, load_config, validate
from calm_dist.environment import log_backend_report
from calm_dist.parallel.launch import init_distributed, shutdown_distributed
from calm_dist.parallel.launcher_watch import LauncherWatch
from calm_dist.parallel.memory import describe
from calm_dist.engines.deepspeed_config import DeepSpeedPresetError, build_ds_config
from calm_dist.training.run_lock import RunLock


def describe_job(cfg, info) -> str:
    """The job's first line: nodes and ranks, the regime and its TP/PP/DP, the backend, the
    device and where checkpoints go. A collective (the ranks' host names are gathered)."""
    hosts = [short_hostname()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, short_hostname())
    nodes = sorted(set(hosts))
    par, backend = cfg.parallel, dist.get_backend() if dist.is_initialized() else "none"
    layout = (f"TP {par.tensor_parallel} x PP {par.pipeline_parallel} x DP {cfg.derived.data_parallel_size}"
              + (f", ZeRO-{par.zero_stage}" if par.zero_stage else ""))
    where = ", ".join(nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
    return (f"job: {info.world_size} rank(s) on {len(nodes)} node(s) ({where}); stage {cfg.training.stage}, "
            f"regime {par.regime} ({layout}); backend {backend} on {info.device.type}; "
            f"checkpoints -> {Path(cfg.training.output_dir).resolve() / 'checkpoints'}")


def regime_advice(cfg, world_size: int) -> str | None:
    """A note for a layout that works but has a faster equivalent: ZeRO-3 on one rank partitions
    nothing, yet its per-module hooks, gradient buckets and flattened optimizer still run (the
    1-rank step is 0.87-0.96x of a plain loop on a CPU; docs/performance.md)."""
    par = cfg.parallel
    if par.regime == "zero3" and par.zero_stage == 3 and world_size == 1:
        return ("note: ZeRO-3 on one rank partitions nothing and its hooks still cost 5-10% per step; "
                "parallel.regime=3d trains the same model faster on one rank")
    return None


def main(argv: list[str] | None = None) -> int:
    start_time = time.time()  # the wall-clock budget counts from here
    parser = argparse.ArgumentParser(prog="calm-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="YAML file or preset name; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the configs, then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-3")
    args = parser.parse_args(argv)
    try:
        cfg = validate(load_config(args.config, args.overrides), world_size=read_dist_env().world_size)
        # The 3d regime trains without DeepSpeed (megatron-core schedules, ZeRO-1 from torch).
        ds_config = build_ds_config(cfg, on_cuda=torch.cuda.is_available()) if cfg.parallel.regime == "zero3" else None
    except (ConfigError, DeepSpeedPresetError) as err:
        print(f"calm-train: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if ds_config is not None:
            print(json.dumps(ds_config, indent=2))
        print(describe(cfg), end="")
        return 0

    setup_job_logging(read_dist_env().rank)  # before megatron-core is imported: it warns at import
    with LauncherWatch():  # an orphaned rank (its torchrun killed) exits instead of hanging on
        return train(cfg, start_time)


def train(cfg, start_time: float) -> int:
    """Join the job's process group and train; the exit code (0, 1: cannot go on, 2: bad input)."""
    # lazy: the trainer imports megatron-core, the data loader and more (seconds); config errors come first
    from calm_dist.training.trainer import Trainer, TrainingStopped

    info = init_distributed(cfg.training.device, timeout_minutes=cfg.training.collective_timeout_minutes)
    clean = False
    try:
        job = describe_job(cfg, info)  # a collective: every rank
        if info.rank == 0:
            logging.getLogger("calm_dist.train").info("%s", job)
            advice = regime_advice(cfg, info.world_size)
            if advice:
                logging.getLogger("calm_dist.train").info("%s", advice)
            log_backend_report()
        with RunLock(cfg.training.output_dir, info.rank):
            Trainer(cfg, info, start_time=start_time).fit()
        clean = True
    except (TrainingStopped, NonFiniteState, CheckpointSaveError) as err:
        # The run cannot go on by itself; what was saved before is intact and the message says which.
        logging.getLogger("calm_dist.train").error("%s", err)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        # Bad input (data, checkpoint, autoencoder, tokenizer): one clear line; the traceback
        # only when asked for (CALM_DIST_DEBUG=1), since these are not bugs of ours.
        logging.getLogger("calm_dist.train").error(
            "%s: %s", type(err).__name__, err, exc_info=os.environ.get("CALM_DIST_DEBUG") == "1"
        )
        return 2
    finally:
        shutdown_distributed(clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
