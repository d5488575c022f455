"""The benchmark suite: every benchmark, one table (figure, target, met), JSON and PNGs.

    python -m bench --quick                 # all CPU benchmarks in a few minutes
    python -m bench                         # larger shapes too (CALM-M-sized generation, a 50k-vocabulary training pair)
    python -m bench --only training,energy  # some of them
    python -m bench --gpu                   # adds the GPU set (MFU per model and attention backend); skipped without CUDA
    python -m bench --quick --out DIR       # results.json, table.md, table.txt, PNGs in DIR (default bench/results)

Each benchmark compares two things measured in the same run and reports their ratio, so the
figures hold on a noisy machine. A target that is not met is reported as not met, with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import quiet_imports
from bench.report import BenchResult, format_table, summary, write_results

# name -> module (each has run(quick=..., [out_dir=...]) -> BenchResult), in the order they run
BENCHMARKS = {
    "flops": "bench.flops_check",
    "energy": "bench.energy",
    "generation": "bench.generation",
    "brier_eval": "bench.brier_eval",
    "peers": "bench.peers",
    "training": "bench.training",
    "cost_curves": "bench.cost_curves",
    "data": "bench.data_bench",
    "zero3": "bench.zero3",
    "gpu": "bench.gpu_mfu",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def run_one(name: str, quick: bool, out_dir: Path) -> BenchResult:
    start = time.perf_counter()
    try:
        module = importlib.import_module(BENCHMARKS[name])
        kwargs = {"quick": quick}
        if "out_dir" in module.run.__code__.co_varnames:
            kwargs["out_dir"] = out_dir
        result = module.run(**kwargs)
    except Exception as err:  # noqa: BLE001 - one failing benchmark is reported; the others still run
        traceback.print_exc()
        result = BenchResult(name, error=f"{type(err).__name__}: {err}"[:400])
    result.seconds = result.seconds or time.perf_counter() - start
    return result


def parse_only(values: list[str]) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}")
    return names


def main(argv=None) -> int:
    quiet_imports()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (< 10 min on 2 CPU cores)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU set (skipped, and said so, without CUDA)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for results.json, tables and PNGs")
    args = parser.parse_args(argv)

    names = parse_only(args.only) or [n for n in BENCHMARKS if n != "gpu" or args.gpu]
    start = time.perf_counter()
    results = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        result = run_one(name, args.quick, args.out)
        print(f"[bench] {name}: {result.seconds:.0f} s", file=sys.stderr, flush=True)
        results.append(result)
    if "gpu" not in names:
        results.append(BenchResult("gpu", skipped="not requested: pass --gpu on a machine with a GPU"))
    elapsed = time.perf_counter() - start
    print(format_table(results))
    print(f"\n{summary(results)}; {elapsed / 60:.1f} min in all ({'--quick' if args.quick else 'full'})")
    paths = write_results(results, args.out, {"quick": args.quick, "only": names, "gpu": args.gpu,
                                              "seconds": elapsed})
    pngs = [p for r in results for p in r.pngs]
    print(f"written: {', '.join(str(p) for p in [*paths.values(), *pngs])}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
