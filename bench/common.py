"""Helpers the benchmarks share: building a CALM and its same-backbone token baseline, and timing
two things interleaved in one run (so that a noisy machine slows both alike)."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn


def quiet_imports() -> None:
    """megatron-core warns once per layer that apex is missing; the benchmarks say what runs instead."""
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)


def job_config(preset: str, overrides: Sequence[str] = ()):
    from calm_dist.config import load_config, validate

    return validate(load_config([preset], list(overrides)))


def build_calm(cfg, seed: int = 0, attention_backend: str | None = None, realistic_head: bool = True) -> nn.Module:
    """A CALM with a randomly initialised (frozen) autoencoder. `realistic_head`: the head's output
    layer is zero at initialisation (every sample coincides); for timing, give it random weights so
    that samples differ as in a trained model (the batch sampler's work depends on it)."""
    from calm_dist.models.autoencoder import Autoencoder
    from calm_dist.models.calm import CALM
    from calm_dist.parallel.state import ensure_model_parallel

    ensure_model_parallel()
    torch.manual_seed(seed)
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder), attention_backend=attention_backend)
    if realistic_head:
        nn.init.normal_(model.head.output.weight, std=cfg.model.init_std)
    return model


def build_baseline(cfg, seed: int = 0, attention_backend: str | None = None) -> nn.Module:
    from calm_dist.models.baseline import TokenBaseline
    from calm_dist.parallel.state import ensure_model_parallel

    ensure_model_parallel()
    torch.manual_seed(seed)
    return TokenBaseline(cfg.model, attention_backend=attention_backend)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call in each of `repeats` rounds, the calls interleaved (a, b, a, b, ...)
    so that load from other jobs falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(time_call(fn, device))
    return seconds


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Best-of-`repeats` seconds per call for each function (time_rounds). The minimum is the least
    disturbed run."""
    return {name: min(times) for name, times in time_rounds(fns, repeats, warmup, device).items()}


def paired_ratio(reference_seconds: list[float], our_seconds: list[float]) -> float:
    """Median over rounds of (reference's time / ours) in the same round. The sides run in turn, so
    each round's two calls share the machine's state (other jobs, clocks, caches), where the
    fastest call of each side alone picks one lucky call of either (a 2-3% swing at the peers
    benchmark's tiny shape)."""
    return statistics.median(r / o for r, o in zip(reference_seconds, our_seconds, strict=True))


def parameter_count(*modules: nn.Module) -> int:
    """Distinct parameters of the given modules (a tied table counts once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_worker(worker: Path, world: int, out: Path, args: Sequence[str], timeout: float = 300.0,
                  extra_env: dict[str, str] | None = None) -> None:
    """One torchrun launch of a bench worker (gloo, OMP_NUM_THREADS=1, `extra_env`) writing into
    `out`; a failure or a timeout raises RuntimeError with the start of the traceback."""
    from calm_dist.common.processes import kill_process_tree

    env = dict(os.environ, **(extra_env or {}), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), TORCH_EXTENSIONS_DIR=str(out / "torch_extensions"))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), "--out", str(out), *args]
    process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process.pid)  # torchrun's ranks run in sessions of their own
        output, _ = process.communicate()
        raise RuntimeError(f"{worker.name} at world {world} timed out after {timeout:.0f} s: {output[-2000:]}")
    if process.returncode != 0:
        first = output.find("Traceback")
        cause = output[first:first + 1500] if first >= 0 else output[-1500:]
        raise RuntimeError(f"{worker.name} at world {world} exited with {process.returncode}: {cause}")
