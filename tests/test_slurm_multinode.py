"""The SLURM scripts on a real two-node cluster: tools/slurm_ci.sh with SLURM_CI_NODES=2 makes each
node a network + UTS namespace (its own address and hostname on a bridge) with its own slurmd, one
CPU each; slurmctld runs on the host. One cluster serves every test here (~4.5 minutes on 2 cores).

What this proves: the scripts run unchanged across nodes (rendezvous on the first node, gloo over
real sockets between two network stacks, checkpoints on the shared file system), results equal a
single-node run bit for bit, and a lost rank or node ends the job in bounded time and the job
comes back. What it cannot: NCCL, InfiniBand, GPUs, more than one CPU per node.

    python -m pytest -m slurm tests/test_slurm_multinode.py
"""

from __future__ import annotations

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
    cancel_leftover_jobs,
    diagnosis,
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


@pytest.fixture(autouse=True)
def empty_queue_and_nodes_up(cluster):
    """Every test starts on an empty queue with both nodes idle, whatever the test before it left
    behind (a test that failed between crash-node and restart-node would fail every test after it)."""
    yield
    cancel_leftover_jobs(cluster)
    for node in ("ci-n1", NODE2):
        # By its slurmd, not by SLURM's view: a node crashed a moment ago still shows idle.
        if run(["bash", CI, "restart-node", node], cluster, check=False).returncode == 0:
            wait_node_settled(cluster, node)
        elif run(["sinfo", "-h", "-n", node, "-o", "%t"], cluster).stdout.strip() != "idle":
            run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], cluster, check=False)  # drained
            wait_node_settled(cluster, node, settle_s=1, timeout=90)


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
    return {"losses": run_losses(root / "run"), "weights": convert(root / "run", root / "converted"),
            "converted": root / "converted"}


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
    assert "nodes=ci-n[1-2]" in text and "job: 2 rank(s) on 2 node(s) (ci-n1, ci-n2)" in text
    assert_same_as_single_node(run_dir, single_node, tmp_path)


def trainer_pids(node: str) -> list[int]:
    """The training processes (not torchrun's agent) running on a node of the cluster."""
    listed = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout
    pids = []
    for pid in listed.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"calm_dist.train" in argv and b"torch.distributed.run" not in argv:
            pids.append(int(pid))
    return pids


def first_step_after(cluster, log: Path, run_dir: Path, step: int, since: float, timeout: float = 120) -> float:
    """Seconds from `since` until the run logs a training step numbered `step` + 1 again."""
    deadline = time.monotonic() + timeout
    seen = len(train_steps_logged(run_dir))
    while True:
        later = train_steps_logged(run_dir)[seen:]
        if step + 1 in later:
            return time.monotonic() - since
        assert time.monotonic() < deadline, f"no step {step + 1} after the restart\n{diagnosis(cluster, log)}"
        time.sleep(0.1)


def wait_node_settled(cluster, node: str, settle_s: float = 5, timeout: float = 60) -> None:
    """Until SLURM has shown the node IDLE for `settle_s` seconds in a row."""
    deadline, idle_since = time.monotonic() + timeout, None
    while True:
        node_state = re.search(r"State=(\S+)", run(["scontrol", "show", "node", node, "-o"], cluster).stdout)
        idle = node_state is not None and node_state.group(1) == "IDLE"
        idle_since = (idle_since or time.monotonic()) if idle else None
        if idle_since is not None and time.monotonic() - idle_since >= settle_s:
            return
        assert time.monotonic() < deadline, f"{node} not idle {timeout} s after its restart\n{diagnosis(cluster)}"
        time.sleep(0.2)


def record(figures: dict, name: str) -> None:
    """The failure figures the README quotes (run with -s to see them)."""
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


def test_preemption_then_a_killed_rank_each_requeue_the_job_which_ends_with_the_single_node_result(
        cluster, data, single_node, tmp_path):
    """One job, two interruptions (one job start less than two tests):
    1. pre-emption: USR1 (SLURM's pre-end signal) -> every rank on both nodes saves -> the job
       requeues itself -> it resumes on both nodes from that checkpoint;
    2. a failure: kill -9 of the trainer on node 2 -> the other node's rank fails at once (its
       collective loses the peer), the job ends and requeues itself (CALM_RESTARTS_ON_FAILURE,
       default 2) -> it resumes from the newest complete checkpoint.
    The losses and weights at the end equal the uninterrupted single-node run's, bit for bit."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    jid = submit(cluster, data, "train.sbatch", run_dir, log)
    wait_training(cluster, jid, run_dir, log)
    run(["scancel", "--signal=USR1", "--batch", jid], cluster)
    wait_requeued(cluster, jid, 1, log)
    stopped = re.search(r"stopped at step (\d+): requeueing", log.read_text())
    assert stopped, f"the job finished before the signal took effect:\n{log.read_text()[-4000:]}"
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < STEPS - 4

    wait_training(cluster, jid, run_dir, log, min_step=stop_step + 3)  # resumed, and some steps on
    pids = trainer_pids(NODE2)
    assert len(pids) == 1, pids
    subprocess.run(["kill", "-9", str(pids[0])], check=True)
    failed_at, failed_step = time.monotonic(), max(train_steps_logged(run_dir))
    while not (state(cluster, jid) == "PENDING" and job(cluster, jid).get("Restarts") == "2"):  # ended, requeued
        assert time.monotonic() - failed_at < 120, log_of(cluster, jid, log)
        time.sleep(0.2)
    ended = time.monotonic() - failed_at
    resume_step = latest_step(run_dir)
    wait_requeued(cluster, jid, 2, log)
    released = time.monotonic()
    to_resume = first_step_after(cluster, log, run_dir, resume_step, released)
    wait_gone(cluster, jid)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "COMPLETED", log_of(cluster, jid, log)
    assert f"resumed from global_step{stop_step} at step {stop_step}" in text
    assert "the trainer failed (exit" in text and "restart 1 of 2 after failures" in text
    assert f"resumed from global_step{resume_step} at step {resume_step}" in text
    assert len((run_dir / "failures.log").read_text().splitlines()) == 1
    assert_same_as_single_node(run_dir, single_node, tmp_path)
    record({"failure to job end": f"{ended:.1f} s", "steps lost": failed_step - resume_step,
            "requeue release to first step": f"{to_resume:.1f} s"}, "killed rank")


def test_a_crashed_node_ends_the_job_and_slurm_requeues_it_to_the_same_result(cluster, data, single_node, tmp_path):
    """Node 2 dies (every process on it, slurmd included, gets SIGKILL): the job ends within
    SlurmdTimeout plus a few seconds (NODE_FAIL), SLURM requeues it (--requeue), it waits for the
    node, and when the node is back it resumes from the newest complete checkpoint to the end."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    jid = submit(cluster, data, "train.sbatch", run_dir, log)
    wait_training(cluster, jid, run_dir, log, min_step=12)
    ci = {**cluster}
    run(["bash", CI, "crash-node", NODE2], ci)
    failed_at, failed_step = time.monotonic(), max(train_steps_logged(run_dir))
    while state(cluster, jid) != "PENDING":
        assert time.monotonic() - failed_at < 120, log_of(cluster, jid, log)
        time.sleep(0.2)
    ended = time.monotonic() - failed_at
    resume_step = latest_step(run_dir)
    node = run(["scontrol", "show", "node", NODE2, "-o"], cluster).stdout
    assert "State=DOWN" in node or "NOT_RESPONDING" in node, node
    run(["bash", CI, "restart-node", NODE2], ci)
    # SLURM holds a requeued job ~2 minutes before it may start again, and a rebooted node takes
    # minutes: the test skips both, so it lets the node settle first. Released the instant the node
    # answers, the job can be given the node while the node is still cleaning up the job's previous
    # run under the same id; the node then drops it and every step waits forever on "Requested
    # nodes are busy" (seen on a loaded 2-core machine).
    wait_node_settled(cluster, NODE2)
    wait_requeued(cluster, jid, int(job(cluster, jid)["Restarts"]), log)
    released = time.monotonic()
    to_resume = first_step_after(cluster, log, run_dir, resume_step, released, timeout=180)
    wait_gone(cluster, jid)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "COMPLETED", log_of(cluster, jid, log)
    assert f"resumed from global_step{resume_step} at step {resume_step}" in text
    assert_same_as_single_node(run_dir, single_node, tmp_path)
    record({"failure to job end": f"{ended:.1f} s", "steps lost": failed_step - resume_step,
            "release to first step": f"{to_resume:.1f} s"}, "crashed node")


def test_pipeline_stages_on_two_nodes_train_like_one_process(cluster, data, single_node, tmp_path):
    """The 3d regime with PP = 2 across the nodes (stage 0 on ci-n1, stage 1 on ci-n2; activations
    and gradients cross between the nodes): losses equal one process's from the same weights."""
    common = ["parallel.regime=3d", "parallel.zero_stage=0", "training.train_steps=4", "training.eval_interval=1000",
              f"training.init_weights={single_node['converted']}"]
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    jid = submit(cluster, data, "train.sbatch", run_dir, log, *common, "parallel.pipeline_parallel=2")
    train(data, "tiny_baseline", tmp_path / "one", *common, nproc=1)
    wait_gone(cluster, jid)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "COMPLETED", log_of(cluster, jid, log)
    assert "TP 1 x PP 2 x DP 1" in text and "on 2 node(s)" in text
    two_nodes, one = run_losses(run_dir), run_losses(tmp_path / "one")
    assert sorted(two_nodes) == [1, 2, 3, 4]
    assert [two_nodes[s] for s in range(1, 5)] == pytest.approx([one[s] for s in range(1, 5)], rel=2e-5, abs=1e-6)


def test_a_sweep_array_whose_tasks_each_take_two_nodes(cluster, data, tmp_path):
    """calm-sweep submits one job array; slurm.sbatch_args gives every task both nodes."""
    import yaml

    sweep = {"name": "two_node_tasks", "base": ["tiny_baseline"], "world_size": 2,
             "overrides": [*data, *TINY, "training.micro_batch_size=2", "training.eval_steps=2",
                           "training.save_interval=100"],
             "sizes": {"a": {"hidden_size": 32, "num_layers": 1}},
             "axes": {"model": ["a"], "tokens": [768, 1536]},
             "slurm": {"sbatch_args": ["--nodes=2"]}}
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(sweep, sort_keys=False))
    cli = [sys.executable, "-m", "calm_dist.sweep.cli"]
    run([*cli, "plan", spec, "--out", tmp_path / "sw"], cluster)
    jid = int(re.search(r"(\d+)", run([*cli, "submit", tmp_path / "sw", "--slurm"], cluster).stdout).group(1))
    deadline = time.monotonic() + 300
    while run(["squeue", "-h"], cluster, check=False).stdout.strip():
        assert time.monotonic() < deadline, diagnosis(cluster)
        time.sleep(1)
    status = run([*cli, "status", tmp_path / "sw"], cluster).stdout
    assert "2 finished" in status, status
    logs = sorted((tmp_path / "sw").glob(f"slurm-{jid}_*.out"))
    assert len(logs) == 2 and all("on 2 node(s)" in p.read_text() for p in logs), [p.name for p in logs]


def test_a_node_that_cannot_reach_the_rendezvous_stops_the_job_before_any_rank_starts(cluster, data, tmp_path):
    """CALM_MASTER_ADDR that no node reaches: each node says so in one line, the job fails with
    exit 2 before any rank starts, nothing trains. The address is TEST-NET-1 (RFC 5737, never
    routed; the nodes have no route to it, so every node fails at once). An unused address on the
    nodes' own subnet fails only after ARP gives up, and once in CI one node's connection to such an
    address succeeded (unexplained), so it would test the network rather than the check."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    unreachable = "192.0.2.1"
    jid = submit(cluster, data, "train.sbatch", run_dir, log, CALM_MASTER_ADDR=unreachable)
    wait_gone(cluster, jid, timeout=90)
    text = log.read_text()
    info = job(cluster, jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log_of(cluster, jid, log)
    for node in ("ci-n1", "ci-n2"):
        assert f"error: node {node} cannot reach the rendezvous {unreachable}:" in text, text[-3000:]
    assert "set CALM_MASTER_ADDR in the site file" in text and "no rank was started" in text
    assert not run_dir.exists()  # not even an empty directory


def netns_names(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0] for line in listed.splitlines() if line.startswith(f"{prefix}-n"))


def hosts_lines(prefix: str) -> int:
    return sum(line.endswith(f"# calm-slurm-ci {prefix}") for line in Path("/etc/hosts").read_text().splitlines())


def test_a_cluster_killed_before_its_stop_is_cleared_by_the_next_start_and_a_live_one_is_refused(cluster, tmp_path):
    """The bridge, namespaces and /etc/hosts lines of a cluster outlive its processes: a CI run killed
    mid-module left them, and every later start failed on them. A start clears such leftovers, and
    still refuses a prefix whose nodes run processes (this module's cluster)."""
    live = {**cluster, "SLURM_CI_BASE": str(tmp_path / "second"), "SLURM_CI_NODES": "2"}
    refused = run(["bash", CI, "start"], live, check=False, timeout=120)
    assert refused.returncode == 1 and "another cluster runs" in refused.stderr, refused.stderr
    assert run(["sinfo", "-h", "-N", "-o", "%t"], cluster).stdout.split() == ["idle", "idle"]

    # A second cluster beside this one (own names, subnet and ports), killed without its stop.
    killed = {**live, "SLURM_CI_PREFIX": "cs", "SLURM_CI_SUBNET": "10.78.0", "SLURM_CI_PORT": "6917",
              "SLURM_CI_BASE": str(tmp_path / "killed")}
    try:
        run(["bash", CI, "start"], killed, timeout=300)
        pids = [(tmp_path / "killed" / "slurmctld.bgpid").read_text().strip()]
        for ns in netns_names("cs"):
            pids += subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-KILL", *pids])  # (a pid that exited meanwhile is fine)
        time.sleep(1)
        assert netns_names("cs") == ["cs-n1", "cs-n2"] and hosts_lines("cs") == 2  # what was left

        again = {**killed, "SLURM_CI_BASE": str(tmp_path / "again")}
        started = run(["bash", CI, "start"], again, timeout=300)
        assert "removing what a killed run left of cluster 'cs'" in started.stderr, started.stderr
        conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout).group(1)
        nodes = run(["sinfo", "-h", "-N", "-o", "%N %t"], {**again, "SLURM_CONF": conf}).stdout.split("\n")
        assert [n for n in nodes if n] == ["cs-n1 idle", "cs-n2 idle"], nodes
        assert hosts_lines("cs") == 2
        run(["bash", CI, "stop"], again)
    finally:  # whichever of the two is still there
        for base in ("again", "killed"):
            run(["bash", CI, "stop"], {**killed, "SLURM_CI_BASE": str(tmp_path / base)}, check=False)
    assert netns_names("cs") == [] and hosts_lines("cs") == 0
    assert subprocess.run(["ip", "link", "show", "cs-br"], capture_output=True).returncode != 0
    assert run(["sinfo", "-h", "-N", "-o", "%t"], cluster).stdout.split() == ["idle", "idle"]
