"""The README's first command at its smoke scale (`--steps-scale 0.1`, as the README gives it):
every stage runs and leaves its outputs.

It runs from a regular (non-editable) install in a fresh venv, started outside the repository, so
it also proves that the installed package carries everything the quickstart reads (presets,
DeepSpeed configs). One quickstart run serves both checks (the install adds ~2 s).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fresh_install import REPO_ROOT, install_into_fresh_venv


def test_quickstart_runs_end_to_end_from_a_regular_install_and_writes_its_outputs(tmp_path):
    python = install_into_fresh_venv(tmp_path / "install")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing points at the sources
    work = tmp_path / "work"  # the current directory: outside the repository, so '' on sys.path is no way in
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import calm_dist; print(calm_dist.__file__)"],
                           capture_output=True, text=True, env=env, cwd=work, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "install" / "venv") and not Path(where).is_relative_to(REPO_ROOT)

    out = tmp_path / "quickstart"
    proc = subprocess.run([str(python), "-m", "calm_dist.quickstart", "--out", str(out), "--steps-scale", "0.1"],
                          capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(1, 7):
        assert f"[{stage}/6]" in proc.stdout
    assert "token baseline (equal training FLOPs)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["autoencoder_recon_acc"] <= 1.0
    assert summary["calm_energy_loss"] > 0 and summary["unconditional_energy_loss"] > 0
    assert 0.0 <= summary["brierlm"] <= 100.0
    assert summary["energy_gap_pct"] == pytest.approx(
        100 * (1 - summary["calm_energy_loss"] / summary["unconditional_energy_loss"]))
    assert 0.0 <= summary["baseline"]["brierlm"] <= 100.0 and summary["baseline"]["loss"] > 0
    assert summary["model_steps"] == 12  # 48 new tokens, one chunk of K = 4 per model step
    assert (out / "sample.txt").read_text().startswith("The state of the Union is")
    for run in ("autoencoder", "calm", "baseline"):
        assert (out / run / "metrics.jsonl").stat().st_size > 0
        assert (out / run / "checkpoints" / "latest").is_file()
    assert (out / "autoencoder" / "autoencoder" / "model.safetensors").is_file()
