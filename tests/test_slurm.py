"""The SLURM scripts against a real single-node SLURM cluster (tools/slurm_ci.sh: Debian's slurm-wlm
and munge on localhost, no cgroups). Needs root, or slurm-wlm, munge and shellcheck installed and a
way to start the daemons; the module fixture installs what is missing (apt-get) and starts and
stops the cluster itself. ~3 minutes on 2 CPU cores. The two-node tests: test_slurm_multinode.py.

    python -m pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import time

import pytest

from tests.dist_utils import REPO_ROOT
from tests.slurm_utils import (
    SLURM,
    cancel_leftover_jobs,
    job,
    latest_step,
    sbatch,
    started_cluster,
    train_steps_logged,
    wait_gone,
    wait_requeued,
)
from tests.slurm_utils import run as _run
from tests.train_utils import TINY, prepared_corpus_overrides

pytestmark = pytest.mark.slurm

# shellcheck findings in files outside this feature, to fix there (then remove the entry).
KNOWN_SHELLCHECK: dict[str, list[str]] = {}  # file -> shellcheck codes tolerated there (none today)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A started one-node cluster; yields the environment for sbatch (SLURM_CONF, a CI site file, ...)."""
    with started_cluster(tmp_path_factory.mktemp("slurm"), nodes=1) as env:
        yield env


@pytest.fixture(autouse=True)
def empty_queue(cluster):
    """Every test starts on an empty queue, whatever the test before it left behind."""
    yield
    cancel_leftover_jobs(cluster)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return prepared_corpus_overrides(tmp_path_factory.mktemp("corpus")) + TINY


def test_shellcheck(cluster):
    scripts = [*SLURM.iterdir(), *(REPO_ROOT / "tools").glob("*.sh"), *(REPO_ROOT / "scripts").glob("*.sh"),
               REPO_ROOT / "test.sh", REPO_ROOT / "quickstart.sh", REPO_ROOT / ".ci" / "run"]
    files = sorted(p for p in scripts if p.is_file() and p.name != "site.sh")  # site.sh: the user's own copy
    assert {"train.sbatch", "train_srun.sbatch", "convert.sbatch", "eval.sbatch", "chain.sh",
            "site.sh.example", "slurm_ci.sh"} <= {p.name for p in files}
    for path in files:
        rel = str(path.relative_to(REPO_ROOT))
        excluded = [f"--exclude={code}" for code in KNOWN_SHELLCHECK.get(rel, [])]
        # -x: follow `source` lines that name a file of ours (slurm/rendezvous.sh)
        proc = _run(["shellcheck", "--shell=bash", "--external-sources", *excluded, path], cluster, check=False)
        assert proc.returncode == 0, f"{rel}:\n{proc.stdout}"


def test_a_second_cluster_on_a_taken_port_is_refused_with_the_fix_named(cluster, tmp_path):
    """Another cluster's slurmctld holds the port (one left by an interrupted run, say): the start
    says so at once, instead of waiting for nodes while sinfo reports the other cluster's, and
    leaves the running cluster alone."""
    from tests.slurm_utils import CI

    second = {**cluster, "SLURM_CI_BASE": str(tmp_path / "second"), "SLURM_CI_PORT": cluster.get("SLURM_CI_PORT", "6817")}
    second.pop("SLURM_CONF")
    proc = _run(["bash", CI, "start"], second, check=False)
    assert proc.returncode != 0
    assert "is taken" in proc.stderr and "SLURM_CI_PORT" in proc.stderr, proc.stderr
    assert not (tmp_path / "second" / "slurmctld.bgpid").exists()  # nothing of its own was started
    nodes = _run(["sinfo", "-h", "-N", "-o", "%t"], cluster).stdout.split()
    assert nodes == ["idle"]


def test_train_job_completes(cluster, data, tmp_path):
    """srun + torchrun (2 workers, c10d on the first node) under sbatch; COMPLETED, last step saved."""
    run, log = tmp_path / "run", tmp_path / "train.out"
    jid = sbatch(cluster, "-c", "2", "-o", log, SLURM / "train.sbatch", "--config", "tiny_baseline", *data,
                 "training.train_steps=4", f"training.output_dir={run}", GPUS_PER_NODE="2")
    wait_gone(cluster, jid)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "COMPLETED", text[-4000:]
    assert "SLURM_RESTART_COUNT=unset" in text and "2 process(es)" in text and "finished" in text
    assert latest_step(run) == 4 and max(train_steps_logged(run)) == 4


@pytest.mark.parametrize("script, resources", [("train.sbatch", ["-c", "2"]),
                                               ("train_srun.sbatch", ["-n", "2", "--ntasks-per-node=2", "-c", "1"])])
def test_a_rendezvous_port_in_use_stops_the_job_before_any_rank_starts(cluster, data, tmp_path, script, resources):
    """One line in the job log names the port and the fix, the job fails at once (no rendezvous
    timeout) and nothing is written."""
    run, log = tmp_path / "run", tmp_path / "train.out"
    with socket.socket() as busy:  # the cluster's node shares this machine's network
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        jid = sbatch(cluster, *resources, "-o", log, SLURM / script, "--config", "tiny_baseline", *data,
                     f"training.output_dir={run}", GPUS_PER_NODE="2", CALM_MASTER_PORT=str(port))
        wait_gone(cluster, jid, timeout=60)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "FAILED", text[-3000:]
    assert f"error: rendezvous port {port} on" in text and "set CALM_MASTER_PORT in the site file" in text
    assert not run.exists()


def test_a_config_the_job_cannot_run_stops_it_before_any_rank_starts(cluster, data, tmp_path):
    """The config is validated for the job's world size (2 ranks here) in the batch shell: one line
    naming the setting, exit 2, no rank started, nothing written, no requeue."""
    run, log = tmp_path / "run", tmp_path / "train.out"
    jid = sbatch(cluster, "-c", "2", "-o", log, SLURM / "train.sbatch", "--config", "tiny_baseline", *data,
                 "training.global_batch_size=4", f"training.output_dir={run}", GPUS_PER_NODE="2")
    wait_gone(cluster, jid, timeout=60)
    text = log.read_text()
    info = job(cluster, jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text[-3000:]
    assert "calm-train: error: training.global_batch_size (4) must be a multiple" in text
    assert "the training config was refused for 2 rank(s)" in text and "rendezvous" not in text
    assert not run.exists()


def test_a_failure_is_retried_once_then_not_again_from_the_same_checkpoint(cluster, data, tmp_path):
    """A trainer that fails (missing training data, found by the ranks): the job requeues itself
    once (CALM_RESTARTS_ON_FAILURE), fails again from the same checkpoint and then stops, FAILED,
    saying why; both failures are in <output_dir>/failures.log."""
    run, log = tmp_path / "run", tmp_path / "train.out"
    jid = sbatch(cluster, "-c", "2", "-o", log, SLURM / "train.sbatch", "--config", "tiny_baseline", *data,
                 f"data.train_path={tmp_path / 'no_such_data'}", f"training.output_dir={run}", GPUS_PER_NODE="2")
    wait_requeued(cluster, jid, 1, log)
    wait_gone(cluster, jid)
    text = log.read_text()
    info = job(cluster, jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", text[-3000:]
    assert "requeueing job" in text and "(restart 1 of 2 after failures)" in text
    assert "failed (exit 1) again from the checkpoint at step 0; not requeueing" in text
    assert len((run / "failures.log").read_text().splitlines()) == 2


def test_train_srun_per_gpu_job_completes(cluster, data, tmp_path):
    """One task per rank (SLURM_PROCID -> rank), MASTER_ADDR/PORT from the script; no torchrun."""
    run, log = tmp_path / "run", tmp_path / "train.out"
    jid = sbatch(cluster, "-n", "2", "--ntasks-per-node=2", "-c", "1", "-o", log, SLURM / "train_srun.sbatch",
                 "--config", "tiny_baseline", *data, "training.train_steps=2", f"training.output_dir={run}")
    wait_gone(cluster, jid)
    text = log.read_text()
    assert job(cluster, jid)["JobState"] == "COMPLETED", text[-4000:]
    assert "2 rank(s)" in text and latest_step(run) == 2
    assert json.loads((run / "checkpoints" / "global_step2" / "meta.json").read_text())["world_size"] == 2


def test_chain_dry_run_and_bad_input(cluster, tmp_path):
    chain = SLURM / "chain.sh"
    before = _run(["squeue", "-h", "-o", "%i"], cluster).stdout
    args = ["--out", tmp_path / "c", "--eval-data", tmp_path / "valid", "--stage1", "tiny_autoencoder",
            "--stage2", "tiny_calm", "--", "data.train_path=x"]
    dry = _run(["bash", chain, "--dry-run", *args], cluster).stdout.splitlines()
    cmds = [line for line in dry if line.startswith("sbatch ")]
    assert len(cmds) == 4 and len(dry) == 4, dry
    assert "slurm/train.sbatch --config tiny_autoencoder" in cmds[0] and "--dependency" not in cmds[0]
    assert "--dependency=afterok:STAGE1_JOB_ID" in cmds[1] and "--config tiny_calm" in cmds[1]
    assert f"training.autoencoder_path={tmp_path}/c/stage1/autoencoder" in cmds[1]
    assert "--dependency=afterok:STAGE2_JOB_ID" in cmds[2] and "slurm/convert.sbatch" in cmds[2]
    assert "--dependency=afterok:CONVERT_JOB_ID" in cmds[3] and "slurm/eval.sbatch" in cmds[3]
    assert not (tmp_path / "c").exists()

    bad = _run(["bash", chain, "--partition", "no_such_partition", *args], cluster, check=False)
    assert bad.returncode == 2 and "partition 'no_such_partition' does not exist" in bad.stderr
    bad = _run(["bash", chain, *args], {**cluster, "CALM_SITE": str(tmp_path / "missing.sh")}, check=False)
    assert bad.returncode == 2 and "cp slurm/site.sh.example slurm/site.sh" in bad.stderr
    nobin = tmp_path / "bin"  # a PATH with the shell tools but no SLURM commands
    nobin.mkdir()
    for tool in ("bash", "dirname", "sed"):
        (nobin / tool).symlink_to(shutil.which(tool))
    bad = _run(["bash", chain, *args], {**cluster, "PATH": str(nobin)}, check=False)
    assert bad.returncode == 2 and "sbatch not found on PATH" in bad.stderr
    assert _run(["squeue", "-h", "-o", "%i"], cluster).stdout == before  # nothing was submitted


def test_chain_runs_in_order(cluster, data, tmp_path):
    out = tmp_path / "chain"
    proc = _run(["bash", SLURM / "chain.sh", "--out", out, "--eval-data", data[1].split("=", 1)[1],
                 "--stage1", "tiny_autoencoder", "--stage2", "tiny_calm", "--sbatch-arg=-c1",
                 "--eval-arg=--max-blocks", "--eval-arg=2", "--", *data, "training.train_steps=2"], cluster)
    ids = dict(re.findall(r"^# (\w+): job (\d+)$", proc.stdout, re.M))
    assert list(ids) == ["stage1", "stage2", "convert", "eval"], proc.stdout
    wait_gone(cluster, *ids.values(), timeout=300)
    jobs = [job(cluster, int(ids[name])) for name in ids]
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((out / "logs").glob("*.out")))
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] * 4, logs
    for before, after in zip(jobs, jobs[1:]):
        assert after["StartTime"] >= before["EndTime"]  # ISO times compare as strings
        assert after["Dependency"] in ("(null)", "")  # satisfied and cleared
    assert (out / "stage1" / "autoencoder").is_dir() and latest_step(out / "stage2") == 2
    assert (out / "converted").is_dir() and json.loads((out / "eval.json").read_text())


def test_sweep_runs_as_a_job_array_then_collects_and_fits(cluster, data, tmp_path):
    """4 tiny baselines (2 sizes x 2 token budgets) submitted as ONE SLURM job array through
    calm-sweep, then collected into a CSV and fitted into a PNG."""
    import yaml

    sweep = {"name": "arr", "base": ["tiny_baseline"],
             "overrides": [*data, "training.eval_steps=2", "training.save_interval=100"],
             "sizes": {"a": {"hidden_size": 32, "num_layers": 1}, "b": {"hidden_size": 64, "num_layers": 2}},
             "axes": {"model": ["a", "b"], "tokens": [768, 1536]}}
    spec = tmp_path / "arr.yaml"
    spec.write_text(yaml.safe_dump(sweep, sort_keys=False))
    cli = [sys.executable, "-m", "calm_dist.sweep.cli"]
    _run([*cli, "plan", spec, "--out", tmp_path / "sw"], cluster)
    _run([*cli, "submit", tmp_path / "sw", "--slurm"], cluster)
    deadline = time.monotonic() + 300
    while _run(["squeue", "-h"], cluster, check=False).stdout.strip():
        assert time.monotonic() < deadline, _run(["squeue"], cluster).stdout
        time.sleep(1)
    status = _run([*cli, "status", tmp_path / "sw"], cluster).stdout
    assert status.count(" finished ") == 4 and "4 finished" in status, status
    _run([*cli, "collect", tmp_path / "sw", "--out", tmp_path / "results.csv"], cluster)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(",finished" in r for r in rows[1:]), rows
    _run([*cli, "fit", tmp_path / "results.csv", "--metric", "loss", "--plot", tmp_path / "frontier.png"], cluster)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
