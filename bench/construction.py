"""Construction memory under ZeRO-3 (part of the peers benchmark): the host memory per rank for
building a CALM-XL-shaped model, partitioned (parallel.zero_init=true, the default: DeepSpeed's
zero.Init) and whole, at 1, 2 and 4 ranks. Each (world, path) is one torchrun launch of
bench/workers/construction_worker.py, which builds the model exactly as the trainer does and
samples its resident set every millisecond.

The shape is CALM-XL's width and vocabulary with 8 of its 16 layers and 1 head block of 4 (the
full model built whole by 4 ranks needs 30 GB; this machine has 24; --quick: a 0.1 GiB model of
8 small layers), with a random frozen autoencoder of the XL preset's shape read from a file as the
trainer reads it. Target, partitioned: the peak per rank within 1.2 x (model bytes / W) + a fixed
overhead = CALM's autoencoder (read whole by every rank, then partitioned by deepspeed.initialize)
+ the largest single module (built whole for an instant before zero.Init splits it: the embedding
table) + 256 MiB (allocator and Python).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from bench.common import job_config, launch_worker
from bench.report import BenchResult, at_most

WORKER = Path(__file__).resolve().parent / "workers" / "construction_worker.py"
WORLDS = (1, 2, 4)
SLACK = 256 << 20
GIB = 1 << 30
# glibc returns a freed block to the system only if it was mmapped, and its threshold for that grows
# up to 32 MiB as blocks are freed: a smaller model's freed full-size weights would stay in the
# resident set. The weights of a model at the sizes zero.Init is for are mostly above it (CALM-XL's
# matrices: 25 to 134 MiB each), so the benchmark fixes the threshold at 1 MiB to see, at any size,
# what such a model's construction needs.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
# --quick: 8 layers of d 512 whose bulk is the layers (a 513-token vocabulary), 0.1 GiB in all.
QUICK_SHAPE = ["model.num_layers=8", "model.num_mlp_layers=1", "model.hidden_size=512", "model.intermediate_size=1376",
               "model.num_attention_heads=8", "model.vocab_size=513", "model.pad_token_id=512", "model.bos_token_id=0",
               "model.eos_token_id=0", "autoencoder.hidden_size=64", "autoencoder.intermediate_size=128"]


def random_autoencoder(overrides: list[str], out: Path) -> Path:
    import torch

    from calm_dist.models.autoencoder import Autoencoder
    from calm_dist.models.autoencoder_io import save_autoencoder

    cfg = job_config("calm_xl", [*overrides, "training.autoencoder_path=unused"])
    torch.manual_seed(0)
    return save_autoencoder(Autoencoder(cfg.autoencoder).state_dict(), cfg.autoencoder, out)


def measure(world: int, zero_init: bool, overrides: list[str], tmp: Path) -> dict:
    out = tmp / f"w{world}-{'partitioned' if zero_init else 'whole'}"
    out.mkdir()
    args = ["--preset", "calm_xl"]
    for override in [*overrides, f"parallel.zero_init={str(zero_init).lower()}"]:
        args += ["--override", override]
    try:
        launch_worker(WORKER, world, out, args, timeout=900, extra_env=MALLOC)
    except RuntimeError as error:
        refusal = re.search(r"building the whole model on each .*? is available", str(error))
        if zero_init or refusal is None:
            raise
        # The trainer's own guard refused the whole copies (the machine's free memory is short of
        # world x the model): the comparison is reported as such, the target does not depend on it.
        return {"refused": refusal.group(0)}
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return max(ranks, key=lambda r: r["peak_bytes"])  # the rank that needed the most


def _whole_note(whole: dict, part: dict) -> str:
    if "refused" in whole:
        return f"built whole: refused ({whole['refused']})"
    return (f"built whole: {whole['peak_bytes'] / GIB:.2f} GiB per rank "
            f"({whole['peak_bytes'] / part['peak_bytes']:.1f}x); {part['seconds']:.0f} s vs {whole['seconds']:.0f} s")


def add_construction_figures(result: BenchResult, quick: bool, worlds: tuple[int, ...] = WORLDS,
                             shape: list[str] | None = None) -> None:
    """One figure per world size into `result` (part of `python -m bench --only peers`); `shape`:
    overrides of calm_xl's model and autoencoder instead of the benchmark's layer count."""
    shape = shape or (QUICK_SHAPE if quick else ["model.num_layers=8", "model.num_mlp_layers=1"])
    # fp32: the partitions keep the training precision (bf16 would halve them), the whole build is
    # fp32 until deepspeed.initialize casts it; the same dtype on both sides isolates the partitioning.
    overrides = [*shape, "data.seq_length=1024", "training.micro_batch_size=1", "training.global_batch_size=4",
                 "training.precision=fp32"]
    result.details["construction shape"] = " ".join(shape)
    with tempfile.TemporaryDirectory(prefix="calm-bench-construction-") as tmp:
        tmp = Path(tmp)
        ae = random_autoencoder(overrides, tmp / "autoencoder")
        overrides.append(f"training.autoencoder_path={ae}")
        for world in worlds:
            part = measure(world, True, overrides, tmp)
            whole = measure(world, False, overrides, tmp)
            result.details[f"construction, world {world}"] = {"partitioned": part, "whole": whole}
            overhead = part["autoencoder_bytes"] + part["largest_module_bytes"] + SLACK
            limit = 1.2 * part["model_bytes"] / world + overhead
            result.add(f"construction peak per rank, partitioned (zero.Init), {world} rank(s)",
                       part["peak_bytes"] / GIB, "GiB", f"<= {limit / GIB:.2f} GiB", at_most(part["peak_bytes"], limit),
                       f"model {part['model_bytes'] / GIB:.2f} GiB / {world} + overhead {overhead / GIB:.2f} GiB; "
                       + _whole_note(whole, part))
