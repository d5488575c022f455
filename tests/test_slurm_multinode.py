"""The SLURM scripts on a real two-node cluster: tools/slurm_ci.sh with SLURM_CI_NODES=2 makes each
node a network + UTS namespace (its own address and hostname on a bridge) with its own slurmd, one
CPU each; slurmctld runs on the host. One cluster serves every test here (~N minutes on 2 cores).

What this proves: the scripts run unchanged across nodes (rendezvous on the first node, gloo over
real sockets between two network stacks, checkpoints on the shared file system), results equal a
single-node run bit for bit, and a lost rank or node ends the job in bounded time and the job
comes back. What it cannot: NCCL, InfiniBand, GPUs, more than one CPU per node.

    python -m pytest -m slurm tests/test_slurm_multinode.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calm_dist.training.golden import run_losses
from calm_dist.weights_file import load_safetensors
from tests.dist_utils import REPO_ROOT
from tests.slurm_utils import (
    CI,
    SLURM,
    job,
    latest_step,
    run,
    sbatch,
    started_cluster,
    state,
    train_steps_logged,
    wait_gone,
    wait_requeued,
    wait_training,
)
from tests.train_utils import TINY, child_env, prepared_corpus_overrides, train

pytestmark = pytest.mark.slurm

STEPS = 40  # long enough for a signal or a failure to land mid-run
RUN = [f"training.train_steps={STEPS}", "training.eval_interval=1000", "training.save_interval=10",
       "training.keep_last=2"]
NODE2 = "ci-n2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with started_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as env:
        yield env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return prepared_corpus_overrides(tmp_path_factory.mktemp("corpus"))


def convert(run_dir: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "convert", str(run_dir), str(out)],
                          capture_output=True, text=True, env=child_env(), timeout=180, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_safetensors(out / "model.safetensors")


@pytest.fixture(scope="module")
def single_node(data, tmp_path_factory) -> dict:
    """The same run on one node: 2 processes under torchrun (no SLURM), its losses and weights."""
    root = tmp_path_factory.mktemp("single")
    train(data, "tiny_baseline", root / "run", *RUN, nproc=2)
    return {"losses": run_losses(root / "run"), "weights": convert(root / "run", root / "converted")}


def submit(cluster, data, script: str, run_dir: Path, log: Path, *extra: str, nodes: int = 2, **env) -> int:
    args = ["--nodes", str(nodes), "-o", log]
    if script == "train_srun.sbatch":
        args += ["--ntasks-per-node=1"]
    return sbatch(cluster, *args, SLURM / script, "--config", "tiny_baseline", *data, *TINY, *RUN,
                  *extra, f"training.output_dir={run_dir}", **env)


def assert_same_as_single_node(run_dir: Path, single_node: dict, tmp_path: Path) -> None:
    losses = run_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == single_node["losses"]  # bit for bit
    weights = convert(run_dir, tmp_path / "converted")
    assert weights.keys() == single_node["weights"].keys()
    assert all(weights[k].equal(single_node["weights"][k]) for k in weights)


def log_of(cluster, jid: int, log: Path) -> str:
    text = log.read_text() if log.exists() else "(no log)"
    return f"{job(cluster, jid).get('JobState')}\n{text[-5000:]}"


@pytest.mark.parametrize("script", ["train.sbatch", "train_srun.sbatch"])
def test_two_nodes_train_like_one_node(cluster, data, single_node, tmp_path, script):
    """One torchrun per node (train.sbatch) or one task per rank (train_srun.sbatch) on 2 nodes:
    ZeRO-3 over gloo between the nodes; losses and converted weights equal the single-node run's."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    jid = submit(cluster, data, script, run_dir, log)
    wait_gone(cluster, jid)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "COMPLETED", log_of(cluster, jid, log)
    assert "nodes=ci-n[1-2]" in text and "on 2 node(s)" in text
    assert {"ci-n1", "ci-n2"} <= set(re.findall(r"@(ci-n\d)\]", text))  # every node's ranks speak
    assert_same_as_single_node(run_dir, single_node, tmp_path)
