"""A real SLURM cluster for tests (tools/slurm_ci.sh) and the commands the SLURM tests share:
submit, inspect and wait for jobs, read what a run wrote."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dist_utils import REPO_ROOT

CI = REPO_ROOT / "tools" / "slurm_ci.sh"
SLURM = REPO_ROOT / "slurm"
# Pending reasons that no amount of waiting changes on this cluster.
NEVER_STARTS = ("BadConstraints", "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidQOS")


def run(args, env, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=kw.pop("cwd", REPO_ROOT), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def started_cluster(base: Path, nodes: int = 1) -> Iterator[dict[str, str]]:
    """Start a cluster of `nodes` nodes under `base`; yields the environment for sbatch (SLURM_CONF,
    a CI site file, ...); stops it and removes what it set up afterwards, also on failure."""
    if os.geteuid() != 0 and not (shutil.which("slurmctld") and shutil.which("shellcheck")):
        pytest.fail("the SLURM tests need root (or slurm-wlm, munge and shellcheck installed); "
                    'deselect them with -m "not gpu and not slurm"')
    # OMP_NUM_THREADS=1 as clusters export it: the nodes must still get every CPU of the machine.
    env = {**os.environ, "SLURM_CI_BASE": str(base / "cluster"), "SLURM_CI_NODES": str(nodes), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    try:
        started = run(["bash", CI, "start"], env, timeout=600)
        conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout)
        assert conf, started.stdout + started.stderr
        site = base / "site.sh"  # the example, without GPU options (the CI nodes have none)
        site.write_text(f"CALM_SBATCH_ARGS=()\nsource {SLURM / 'site.sh.example'}\n")
        env.update(SLURM_CONF=conf.group(1), CALM_SITE=str(site), CALM_ROOT=str(REPO_ROOT), CALM_PYTHON=sys.executable,
                   PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore", GPUS_PER_NODE="1")
        print(f"{nodes}-node cluster up in {time.monotonic() - t0:.1f} s")
        yield env
    finally:
        run(["bash", CI, "stop"], env, check=False)


def cancel_leftover_jobs(env) -> list[str]:
    """Cancel whatever a test left in the queue (a failed test's job would otherwise hold the nodes
    and fail every test after it) and wait until it is gone; the job ids cancelled."""
    left = run(["squeue", "-h", "-o", "%i"], env, check=False).stdout.split()
    if left:
        run(["scancel", *left], env, check=False)
        deadline = time.monotonic() + 90
        while run(["squeue", "-h"], env, check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    return left


def diagnosis(env, log: Path | None = None) -> str:
    """What a failed SLURM test prints: the queue, the nodes, the calm-dist processes on this machine
    (with their network namespace: one per node of an N-node cluster) and the job log's tail."""
    queue = run(["squeue", "-o", "%i %T %M %R"], env, check=False).stdout
    nodes = run(["sinfo", "-N", "-o", "%N %T %E"], env, check=False).stdout
    procs = []
    for pid in run(["pgrep", "-f", "calm_dist|torch.distributed.run"], env, check=False).stdout.split():
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except OSError:
            continue
        procs.append(f"  {pid} {netns} {argv}")
    daemons = ""
    for daemon_log in sorted(Path(env.get("SLURM_CI_BASE", "/nonexistent"), "log").glob("*.log")):
        daemons += f"{daemon_log.name}:\n" + "\n".join(daemon_log.read_text().splitlines()[-15:]) + "\n"
    text = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
    return (f"queue:\n{queue}nodes:\n{nodes}processes:\n" + "\n".join(procs)
            + f"\ndaemon logs:\n{daemons}job log tail:\n{text}")


def sbatch(env, *args, **extra_env) -> int:
    out = run(["sbatch", "--parsable", *args], {**env, **extra_env}).stdout.strip()
    return int(out.split(";")[0])


def job(env, jid: int) -> dict[str, str]:
    text = run(["scontrol", "show", "job", "-o", jid], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def state(env, jid: int) -> str:
    return run(["squeue", "-h", "-j", jid, "-o", "%T"], env, check=False).stdout.strip()


def assert_can_start(env, jid: int) -> None:
    """Fail at once, with SLURM's reason, for a pending job that will never start (e.g. it asks
    for more CPUs than the cluster has), instead of waiting out a timeout with an empty log."""
    info = job(env, jid)
    if info.get("JobState") != "PENDING":
        return
    nodes = run(["scontrol", "show", "node", "-o"], env).stdout
    total = sum(int(n) for n in re.findall(r"CPUTot=(\d+)", nodes))
    wanted = int(info.get("NumCPUs") or 0)
    reason = info.get("Reason", "")
    assert reason not in NEVER_STARTS and wanted <= total, (
        f"job {jid} cannot start: pending ({reason}), it asks for {wanted} CPUs and the cluster has {total}")


def wait_gone(env, *jids: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while any(state(env, j) for j in jids):
        for j in jids:
            assert_can_start(env, j)
        assert time.monotonic() < deadline, f"jobs {jids} still queued after {timeout} s\n{diagnosis(env)}"
        time.sleep(0.5)


def wait_requeued(env, jid: int, restarts: int, log: Path, timeout: float = 120) -> None:
    """Until the job is pending again after its `restarts`-th requeue; then skip SLURM's hold
    (a requeued job may start again only ~2 minutes later)."""
    deadline = time.monotonic() + timeout
    while not (state(env, jid) == "PENDING" and job(env, jid).get("Restarts") == str(restarts)):
        assert time.monotonic() < deadline, f"not requeued: {state(env, jid)}\n{diagnosis(env, log)}"
        time.sleep(0.3)
    run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env)


def wait_training(env, jid: int, run_dir: Path, log: Path, min_step: int = 1, timeout: float = 120) -> None:
    """Until the run has logged a training step >= min_step."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").exists() or max(train_steps_logged(run_dir), default=0) < min_step:
        assert state(env, jid) in ("PENDING", "RUNNING"), log.read_text()[-4000:] if log.exists() else "no log"
        assert_can_start(env, jid)
        assert time.monotonic() < deadline, f"no training step {min_step} after {timeout} s\n{diagnosis(env, log)}"
        time.sleep(0.2)


def latest_step(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoints"
    return json.loads((ckpt / (ckpt / "latest").read_text().strip() / "meta.json").read_text())["train_state"]["step"]


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def train_steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in train_rows(run_dir)]
