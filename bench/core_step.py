"""CALM vs the token baseline, forward + backward at equal batch (tokens per step), same backbone.

Kept as an entry point for tools/gpu_check.sh; the benchmark itself is bench/training.py.

    python -m bench.core_step --calm calm_m --baseline transformer_m --seq 2048 --batch 4   # GPU
    python -m bench.core_step --calm tiny_calm --baseline tiny_baseline --seq 256 --batch 4  # CPU
"""

from bench.training import main

if __name__ == "__main__":
    main()
