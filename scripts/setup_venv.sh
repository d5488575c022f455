#!/usr/bin/env bash
# Create ./.venv with the pinned requirements and calm-dist installed (editable). Idempotent:
# a venv whose requirements are unchanged since its last install is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.calm-dist-installed"
digest="$(cat requirements.txt requirements-bench.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "installing requirements into .venv (about a minute) ..."
    # DS_BUILD_OPS=0: DeepSpeed installs as pure Python; no op is compiled at install time.
    DS_BUILD_OPS=0 .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-bench.txt
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
    echo "$digest" > "$stamp"
fi
