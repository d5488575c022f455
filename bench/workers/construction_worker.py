"""Worker for bench/construction.py: the host memory one rank needs to build the model for the
zero3 engine, built partitioned (parallel.zero_init=true, DeepSpeed's zero.Init) or whole, exactly
as the trainer builds it (calm_dist.engines.deepspeed_zero.build_zero_model).

The resident set is sampled every millisecond while the model is built; the figure is its peak
above the resident set just before (imports and the process group excluded; CALM's autoencoder,
read whole from its file by both paths, included). Each rank writes `<out>/rank<R>.json`.

    torchrun --nproc_per_node 2 bench/workers/construction_worker.py --out DIR --preset calm_xl \
        --override training.autoencoder_path=AE --override parallel.zero_init=true
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
import warnings
from pathlib import Path


class PeakRss:
    """The largest resident set seen by a 1 ms sampling thread between start and stop."""

    def __init__(self):
        import psutil

        self._process, self.peak, self._done = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> "PeakRss":
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", required=True)
    p.add_argument("--override", action="append", default=[])
    args = p.parse_args()

    import psutil

    from calm_dist.parallel.launch import init_distributed, shutdown_distributed

    info = init_distributed("cpu")
    from calm_dist.config import load_config, validate
    from calm_dist.engines.construction_memory import built_param_count
    from calm_dist.engines.deepspeed_config import build_ds_config
    from calm_dist.engines.deepspeed_zero import build_zero_model
    from calm_dist.parallel.state import current_layout, ensure_model_parallel, seed_model_building

    cfg = validate(load_config([args.preset], args.override), world_size=info.world_size)
    ensure_model_parallel()
    seed_model_building(cfg.training.seed, current_layout())
    ds_config = build_ds_config(cfg, on_cuda=False)
    gc.collect()
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with PeakRss() as rss:
        model = build_zero_model(cfg, ds_config)
    seconds = time.perf_counter() - start
    held = psutil.Process().memory_info().rss - before
    modules = [sum(getattr(q, "ds_numel", q.numel()) for q in m.parameters(recurse=False)) for m in model.modules()]
    autoencoder = getattr(model, "autoencoder", None)
    record = {
        "rank": info.rank, "world": info.world_size, "zero_init": cfg.parallel.zero_init,
        "peak_bytes": rss.peak - before, "held_bytes": held, "seconds": seconds,
        "model_bytes": 4 * built_param_count(cfg),
        "largest_module_bytes": 4 * max(modules),
        "autoencoder_bytes": 4 * sum(q.numel() for q in autoencoder.parameters()) if autoencoder is not None else 0,
    }
    (args.out / f"rank{info.rank}.json").write_text(json.dumps(record))
    shutdown_distributed(clean=True)


if __name__ == "__main__":
    main()
