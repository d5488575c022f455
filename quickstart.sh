#!/usr/bin/env bash
# The default end-to-end job on CPU: installs into ./.venv if needed, then prepares the bundled
# corpus, trains a tiny autoencoder and a tiny CALM, evaluates them and prints a sample.
# Extra arguments go to `python -m calm_dist.quickstart` (e.g. --preset demo, --out DIR).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec .venv/bin/python -m calm_dist.quickstart "$@"
