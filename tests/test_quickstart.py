"""The README's first command, with reduced step counts: every stage runs and leaves its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist_utils import REPO_ROOT


def test_quickstart_runs_end_to_end_and_writes_its_outputs(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "calm_dist.quickstart", "--out", str(out), "--steps-scale", "0.05"],
                          capture_output=True, text=True, env=env, timeout=900)
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
