#!/usr/bin/env bash
# Run the test suite (installs into ./.venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"  # any JIT build stays in the work tree
exec .venv/bin/python -m pytest -q "$@"
