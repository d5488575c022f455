"""The package's structure holds: the import-linter contracts in pyproject.toml (layers, no cycles)
are kept, counting imports inside functions too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.dist_utils import REPO_ROOT


def test_import_contracts_are_kept():
    """Layers from the entry points down to config, and no cycle between sibling modules or
    packages at any depth (`lint-imports` reads them from pyproject.toml)."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "2 kept" in proc.stdout, proc.stdout[-2000:]
