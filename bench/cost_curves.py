"""How the training cost grows with its work: tokens/s of one training step (forward + backward,
bench/training.py's step) of CALM and of its token baseline with the same backbone, against the
sequence length (256 to 2048 tokens, batch 1) and against the batch (1 to 16 sequences of 256
tokens), one axis at a time, at the tiny shape; one PNG (cost_curves.png).

Flat curves mean a cost linear in the work. Attention's share grows with the length (the
baseline's grows K times faster than CALM's, which attends over chunks); a larger batch amortises
per-call overhead. The figures are information, without targets: the ratio of tokens/s at the
largest work to the smallest, per model and axis.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.report import BenchResult, matplotlib_pyplot, save_png
from bench.training import measure

NAME = "cost_curves"
LENGTHS, BATCHES, BATCH_LENGTH = (256, 512, 1024, 2048), (1, 2, 4, 8, 16), 256
QUICK_LENGTHS, QUICK_BATCHES = (256, 1024), (1, 4)
OVERRIDES = ["model.max_position_embeddings=2048"]  # the baseline reads up to 2048 positions
MODELS = ("calm", "baseline")


def sweep(lengths, batches, repeats: int) -> dict[str, list[dict]]:
    along_length = [measure("tiny_calm", "tiny_baseline", OVERRIDES, seq, 1, repeats, breakdown=False)
                    for seq in lengths]
    along_batch = [measure("tiny_calm", "tiny_baseline", OVERRIDES, BATCH_LENGTH, batch, repeats, breakdown=False)
                   for batch in batches]
    return {"length": along_length, "batch": along_batch}


def plot(points: dict[str, list[dict]], path: Path) -> bool:
    plt = matplotlib_pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (axis, key, label) in zip(axes, (("length", "seq_tokens", "sequence length (tokens), batch 1"),
                                             ("batch", "batch", f"batch (sequences of {BATCH_LENGTH} tokens)"))):
        for model in MODELS:
            xs = [m[key] for m in points[axis]]
            ax.plot(xs, [m[f"{model}_tokens_per_s"] for m in points[axis]], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(label)
        ax.set_ylabel("training tokens/s (forward + backward)")
        ax.legend()
    fig.suptitle("tiny CALM and its token baseline: training tokens/s against the work")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(quick: bool = False, out_dir: Path | None = None) -> BenchResult:
    start = time.perf_counter()
    result = BenchResult(NAME)
    lengths, batches = (QUICK_LENGTHS, QUICK_BATCHES) if quick else (LENGTHS, BATCHES)
    points = sweep(lengths, batches, repeats=2 if quick else 3)
    result.details["points"] = {axis: [{k: m[k] for k in ("seq_tokens", "batch", "calm_tokens_per_s",
                                                          "baseline_tokens_per_s")} for m in ms]
                                for axis, ms in points.items()}
    for axis, key in (("length", "seq_tokens"), ("batch", "batch")):
        first, last = points[axis][0], points[axis][-1]
        for model in MODELS:
            ratio = last[f"{model}_tokens_per_s"] / first[f"{model}_tokens_per_s"]
            result.add(f"{model}: tokens/s at {axis} {last[key]} / at {axis} {first[key]}", ratio, "x", "", None,
                       f"{first[f'{model}_tokens_per_s']:,.0f} -> {last[f'{model}_tokens_per_s']:,.0f} tokens/s; "
                       "1x: cost linear in the work")
    save_png(result, out_dir, "cost_curves.png", lambda png: plot(points, png))
    result.seconds = time.perf_counter() - start
    return result
