"""A regular (non-editable) install of this repository into a new virtual environment, as a user's
`pip install .` makes one, for tests that must not see the source tree.

The new venv holds calm-dist alone; its dependencies (torch, DeepSpeed, ...) come from the
environment running the tests, named in a .pth file, so nothing is downloaded. A .pth line that is
a directory only extends sys.path: the .pth files inside it (the editable install's finder among
them) are not run, so the import of calm_dist finds the installed copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "calm_dist")  # what the wheel is built from
_PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def _run(cmd: list[str], **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def build_wheel(dest: Path) -> Path:
    """Build the wheel from a copy of the build inputs: an in-tree build would write build/ into
    the repository."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in BUILD_INPUTS:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    _run([*_PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest / "wheels"), str(src)])
    (wheel,) = (dest / "wheels").glob("calm_dist-*.whl")
    return wheel


def install_into_fresh_venv(dest: Path) -> Path:
    """`dest/venv` with the wheel installed; returns its python."""
    wheel = build_wheel(dest)
    venv.create(dest / "venv", with_pip=False, symlinks=True)
    python = dest / "venv" / "bin" / "python"
    # pip runs inside the new venv (--python) before the dependencies are visible there, so it
    # neither sees nor touches the running environment's calm-dist.
    _run([*_PIP, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    site_packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    ours = sysconfig.get_paths()
    dependencies = dict.fromkeys([ours["purelib"], ours["platlib"]])  # one line each, in order
    (Path(site_packages) / "_calm_dist_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return python
