"""Energy loss: our fp32 implementation (calm_dist/ops/energy.py) against a naive materialised one.

Both compute the same loss (CALM.md §2.5) at the reference's N = 8 model samples and M = 100 target
samples, latent size 128, over P positions (2048 = one of the paper's sequences of 2048 chunks).
The naive version broadcasts the differences into a (P, N, M, D) tensor and takes its norm, as the
reference's pseudo-code reads; autograd keeps that tensor for the backward. Measured: forward +
backward time (best of repeats, interleaved), peak resident memory above the inputs (Linux VmHWM,
reset before each run), and the bytes autograd saves for the backward. The two must agree.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench.common import time_interleaved
from bench.report import BenchResult, at_least, at_most
from calm_dist.ops.energy import EnergyLoss, energy_loss

NAME = "energy"


def naive_energy_loss(samples_NPD: torch.Tensor, targets_MPD: torch.Tensor) -> EnergyLoss:
    """The loss with every difference materialised (beta = 1): (P, N, M, D) and (P, N, N, D) tensors."""
    s_PND = samples_NPD.float().transpose(0, 1)
    t_PMD = targets_MPD.detach().float().transpose(0, 1)
    n = s_PND.shape[1]
    fidelity_P = (s_PND[:, :, None] - t_PMD[:, None]).norm(dim=-1).mean(dim=(1, 2))
    pair_PNN = (s_PND[:, :, None] - s_PND[:, None]).norm(dim=-1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    diversity_P = (pair_PNN * off_diagonal).sum(dim=(1, 2)) / (n * (n - 1))
    fidelity, diversity = fidelity_P.mean(), diversity_P.mean()
    return EnergyLoss(2 * fidelity - diversity, fidelity, diversity)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while `fn` builds its graph."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(fn) -> float | None:
    """Peak resident memory that `fn` adds, in MiB (Linux: VmHWM reset through clear_refs); None elsewhere."""
    gc.collect()
    try:
        _CLEAR_REFS.write_text("5")  # resets the peak RSS to the current RSS
        before = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_kib("VmHWM") - before) / 1024


def measure(positions: int, num_samples: int = 8, num_targets: int = 100, latent: int = 128,
            repeats: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(num_samples, positions, latent, generator=g).requires_grad_(True)
    targets = torch.randn(num_targets, positions, latent, generator=g) * 0.3 + torch.randn(positions, latent, generator=g)
    impls = {"ours": energy_loss, "naive": naive_energy_loss}

    def step(impl):
        def fn():
            impl(samples, targets).loss.backward()
            samples.grad = None
        return fn

    losses, grads = {}, {}
    for name, impl in impls.items():
        out = impl(samples, targets)
        out.loss.backward()
        losses[name], grads[name] = out.loss.item(), samples.grad.clone()
        samples.grad = None
    seconds = time_interleaved({name: step(impl) for name, impl in impls.items()}, repeats=repeats, warmup=0)
    out = {"positions": positions, "N": num_samples, "M": num_targets, "D": latent,
           "naive_difference_tensor_mib": positions * num_samples * num_targets * latent * 4 / 2**20}
    for name, impl in impls.items():
        out[f"{name}_ms"] = 1e3 * seconds[name]
        out[f"{name}_saved_mib"] = saved_bytes(lambda: impl(samples, targets).loss) / 2**20
        out[f"{name}_peak_mib"] = peak_memory_mib(step(impl))
    out["loss_ours"], out["loss_naive"] = losses["ours"], losses["naive"]
    out["loss_rel_diff"] = abs(losses["ours"] - losses["naive"]) / abs(losses["naive"])
    out["grad_rel_diff"] = ((grads["ours"] - grads["naive"]).abs().max() / grads["naive"].abs().max()).item()
    out["speedup"] = out["naive_ms"] / out["ours_ms"]
    if out["ours_peak_mib"] is not None and out["naive_peak_mib"] is not None:
        out["peak_ratio"] = out["naive_peak_mib"] / max(out["ours_peak_mib"], 1e-3)
    return out


def run(quick: bool = False, positions: int = 2048) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    m = measure(positions, repeats=2 if quick else 3)
    result.details = m
    shape = f"P={positions}, N=8, M=100, D=128"
    result.add(f"time, naive / ours ({shape}, fwd+bwd)", m["speedup"], "x", ">= 1x", at_least(m["speedup"], 1.0),
               f"ours {m['ours_ms']:.0f} ms, naive {m['naive_ms']:.0f} ms")
    if "peak_ratio" in m:
        result.add("peak memory, naive / ours", m["peak_ratio"], "x", ">= 1x", at_least(m["peak_ratio"], 1.0),
                   f"ours {m['ours_peak_mib']:.0f} MiB, naive {m['naive_peak_mib']:.0f} MiB above the inputs (VmHWM)")
    else:
        result.add("peak memory, naive / ours", None, "x", ">= 1x", None, "VmHWM not available on this system")
    result.add("saved for backward, ours", m["ours_saved_mib"], "MiB", "", None,
               f"naive {m['naive_saved_mib']:.0f} MiB (its difference tensor alone: "
               f"{m['naive_difference_tensor_mib']:.0f} MiB)")
    agree = max(m["loss_rel_diff"], m["grad_rel_diff"])
    result.add("agreement (max relative difference, loss and gradient)", agree, "", "<= 1e-5", at_most(agree, 1e-5),
               f"loss {m['loss_ours']:.6g} vs {m['loss_naive']:.6g}")
    result.seconds = time.perf_counter() - start
    return result
