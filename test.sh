#!/usr/bin/env bash
# Run the test suite (installs into ./.venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"  # any JIT build stays in the work tree
# Two workers (pytest-xdist), each taking whole test modules (tests/conftest.py groups them); the
# many multi-process tests leave a single pytest process waiting about half the time on 2 cores.
# CALM_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -q -n "${CALM_TEST_WORKERS:-2}" "$@"
