"""Integrity under faults, on real 2-rank DeepSpeed ZeRO-3 runs (tiny autoencoder stage, gloo).

Every fault ends one of two ways: (a) the final losses equal an uninterrupted run's bit for bit, or
(b) one clear line naming the file, and no good checkpoint deleted. The fault table in docs/faults.md
points at these tests. Faults in the model (NaN gradients, NaN weights) are planted with
tools/fault_inject.py; the others are done to the files, the disk and the processes themselves.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calm_dist.common.processes import pid_alive
from tests.dist_utils import REPO_ROOT, free_port
from tests.train_utils import TINY, child_env, prepared_corpus_overrides

PRESET = "tiny_autoencoder"
STEPS = 8
RUN = [f"training.train_steps={STEPS}", "training.save_interval=2", "training.keep_last=10", "training.eval_steps=0"]
FAULT_TOOL = REPO_ROOT / "tools" / "fault_inject.py"


def _command(data: list[str], out: Path, *overrides: str, nproc: int = 2, fault: list[str] | None = None) -> list[str]:
    entry = [str(FAULT_TOOL), *(fault or []), "--"] if fault is not None else ["-m", "calm_dist.train"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())]
    return [*launcher, *entry, "--config", PRESET, *data, *TINY, f"training.output_dir={out}", *overrides]


def _run(data, out, *overrides, fault=None, nproc=2, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(data, out, *overrides, nproc=nproc, fault=fault), capture_output=True,
                          text=True, env=child_env(), timeout=timeout)


def _losses(run_dir: Path) -> dict[int, list[float]]:
    """Every logged training loss per step (a step re-run after a fault is logged again)."""
    from calm_dist.training.metrics import read_metrics

    losses: dict[int, list[float]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record.get("kind") == "train":
            losses.setdefault(record["step"], []).append(record["loss"])
    return losses


def _assert_same_losses(run_dir: Path, reference: dict[int, list[float]], steps=range(1, STEPS + 1)) -> None:
    got = _losses(run_dir)
    for step in steps:
        assert step in got, f"step {step} never ran: {sorted(got)}"
        assert all(loss == reference[step][0] for loss in got[step]), (step, got[step], reference[step])


def _flip(path: Path, at: float = 0.5, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("global_step"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus_overrides(tmp_path_factory.mktemp("faults_data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: checkpoints at steps 2, 4, 6, 8 and its losses."""
    out = tmp_path_factory.mktemp("faults_reference") / "run"
    proc = _run(data, out, *RUN)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, _losses(out)


def test_damaged_checkpoints_are_named_set_aside_and_an_intact_one_resumes(data, reference, tmp_path):
    """Bytes flipped in an optimizer shard of the newest checkpoint, a model shard of the one before
    truncated: `calm-convert verify` names both files; a resume with the fallback off refuses, naming
    the file; with it on (the default) both are renamed aside (kept) and the run resumes from the
    newest intact one, ending with the uninterrupted run's losses bit for bit."""
    from calm_dist.convert.cli import main as convert_main

    source, ref_losses = reference
    run = tmp_path / "run"
    shutil.copytree(source, run)
    flipped = run / "checkpoints" / "global_step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncated = run / "checkpoints" / "global_step6" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    _flip(flipped)
    truncated.write_bytes(truncated.read_bytes()[:-100])

    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "verify", str(run), "--all"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 2 and str(flipped) in proc.stdout and str(truncated) in proc.stdout
    assert "does not match its checksum" in proc.stdout and "truncated or replaced" in proc.stdout

    proc = _run(data, run, *RUN, "training.resume_fallback=false")
    assert proc.returncode != 0 and str(flipped) in proc.stderr and "does not match its checksum" in proc.stderr
    assert _tags(run) == ["global_step2", "global_step4", "global_step6", "global_step8"]  # nothing moved

    proc = _run(data, run, *RUN)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("CHECKPOINT DAMAGED") == 2 and "resuming from global_step4 instead" in proc.stderr
    assert _tags(run) == ["global_step2", "global_step4", "global_step6", "global_step6.damaged",
                          "global_step8", "global_step8.damaged"]
    assert (run / "checkpoints" / "global_step8.damaged" / flipped.name).is_file()  # kept, not deleted
    _assert_same_losses(run, ref_losses)
    assert convert_main(["verify", str(run), "--all"]) == 0  # the re-saved checkpoints are intact


def test_a_non_finite_state_is_never_saved_and_no_good_checkpoint_is_pruned(data, tmp_path):
    """Weights that turn NaN (what a divergence leaves): the losses go non-finite and are skipped,
    the run stops after max_bad_steps with exit 1, refusing to save the NaN state; with keep_last=1
    the last good checkpoint is still there, `latest` names it, and it verifies."""
    run = tmp_path / "run"
    proc = _run(data, run, "training.train_steps=10", "training.save_interval=2", "training.keep_last=1",
                "training.eval_steps=0", "training.max_bad_steps=3", fault=["--nan-weights-at", "5"])
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "3 non-finite losses or gradients in a row" in proc.stderr
    assert "not saving step 4" in proc.stderr and str(run / "checkpoints" / "global_step4") in proc.stderr
    assert _tags(run) == ["global_step4"] and (run / "checkpoints" / "latest").read_text() == "global_step4"
    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "verify", str(run)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0 and "weights finite" in proc.stdout, proc.stdout + proc.stderr


def test_non_finite_gradients_with_a_finite_loss_are_skipped_on_every_rank(data, tmp_path):
    """A finite loss whose gradients are NaN (planted at the 3rd step): the step is dropped on both
    ranks, counted like a non-finite loss, and the run ends with finite weights."""
    run = tmp_path / "run"
    proc = _run(data, run, "training.train_steps=4", "training.save_interval=4", "training.eval_steps=0",
                fault=["--nan-grad-at", "3"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("non-finite gradients at step 3: skipped") == 2  # both ranks
    meta = json.loads((run / "checkpoints" / "global_step4" / "meta.json").read_text())
    assert meta["train_state"]["skipped_batches"] == 1 and meta["train_state"]["step"] == 4
    from calm_dist.checkpoint.manager import consolidate_fp32

    weights = consolidate_fp32(run / "checkpoints", "global_step4")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_damaged_shards_are_named_before_or_when_read(data, tmp_path):
    """A truncated shard late in the list fails at start-up naming it; shards whose bytes were
    flipped fail when read (or at start-up with data.verify=full) naming the shard, never training
    on wrong ids; `calm-prepare-data verify` names them too."""
    train_dir = Path(next(a for a in data if a.startswith("data.train_path=")).split("=", 1)[1])
    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    shards = sorted(copy.glob("*.tar"))
    moved = [a if not a.startswith("data.train_path=") else f"data.train_path={copy}" for a in data]
    last = shards[-1]
    last.write_bytes(last.read_bytes()[:-512])
    proc = _run(moved, tmp_path / "a", "training.train_steps=2", nproc=1)
    assert proc.returncode != 0 and str(last) in proc.stderr and "truncated or replaced" in proc.stderr
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # refused before training

    shutil.rmtree(copy)
    shutil.copytree(train_dir, copy)
    for shard in shards:
        _flip(shard, at=0.6)
    proc = _run(moved, tmp_path / "b", "training.train_steps=2", nproc=1)
    assert proc.returncode != 0 and "do not match the sha256" in proc.stderr and str(copy) in proc.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()
    proc = _run(moved, tmp_path / "c", "training.train_steps=2", "data.verify=full", nproc=1)
    assert proc.returncode != 0 and f"(and {len(shards) - 1} more)" in proc.stderr
    assert not (tmp_path / "c" / "metrics.jsonl").exists()
    proc = subprocess.run([sys.executable, "-m", "calm_dist.cli.prepare_data", "verify", str(copy)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 1 and proc.stdout.count("DAMAGED") == len(shards), proc.stdout


DISK_FULL_SCRIPT = """
set -u
mount -t tmpfs -o size={small}k calm-fault-tmpfs {mount}
{launch} > {logs}/first.log 2>&1; echo $? > {logs}/first.rc
ls -a {mount}/run/checkpoints > {logs}/first.ls 2>&1
mount -o remount,size={medium}k {mount}
{launch} > {logs}/second.log 2>&1; echo $? > {logs}/second.rc
ls -a {mount}/run {mount}/run/checkpoints > {logs}/second.ls 2>&1
dd if=/dev/zero of={mount}/filler bs=64k > /dev/null 2>&1
{launch} > {logs}/lock.log 2>&1; echo $? > {logs}/lock.rc
ls -a {mount}/run > {logs}/lock.ls 2>&1
rm {mount}/filler
mount -o remount,size=65536k {mount}
{launch} > {logs}/third.log 2>&1; echo $? > {logs}/third.rc
cp -r {mount}/run {logs}/run
"""


def test_disk_full_during_saves_loses_nothing_and_the_next_launch_resumes(data, reference, tmp_path):
    """On a real full filesystem (a tmpfs in a private mount namespace): the first save cannot be
    written (one line: no space, the path, free space; the partial removed), the second is refused
    before writing (it would not fit beside the first), a launch on a completely full disk cannot
    even write its lock (one line, no empty lock left), and once space exists the same command
    resumes without a person and ends with the uninterrupted run's losses bit for bit."""
    source, ref_losses = reference
    manifest = json.loads((source / "checkpoints" / "global_step8" / "manifest.json").read_text())
    checkpoint_kb = sum(entry["bytes"] for entry in manifest["files"].values()) // 1024
    mount, logs = tmp_path / "mnt", tmp_path / "logs"
    mount.mkdir()
    logs.mkdir()
    launch = " ".join(f"'{arg}'" for arg in _command(data, mount / "run", *RUN))
    script = DISK_FULL_SCRIPT.format(small=checkpoint_kb // 2, medium=checkpoint_kb * 8 // 5, mount=mount,
                                     logs=logs, launch=launch)
    proc = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True,
                          env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr

    first, second = (logs / "first.log").read_text(), (logs / "second.log").read_text()
    assert (logs / "first.rc").read_text().strip() != "0"
    assert "saving global_step2" in first and "no space left on the device" in first and "MB free" in first
    assert "partial" not in (logs / "first.ls").read_text()  # the .partial does not keep the disk full
    assert (logs / "second.rc").read_text().strip() != "0"
    assert "cannot save global_step4" in second and "Nothing was written" in second
    listing = (logs / "second.ls").read_text()
    assert "global_step2" in listing and "partial" not in listing and ".run.lock" not in listing
    # Launched on a completely full disk: the run lock cannot be written, which one line says; no
    # empty lock is left behind to refuse every later launch.
    assert (logs / "lock.rc").read_text().strip() != "0"
    assert "cannot write the run lock" in (logs / "lock.log").read_text()
    assert ".run.lock" not in (logs / "lock.ls").read_text()
    assert (logs / "third.rc").read_text().strip() == "0", (logs / "third.log").read_text()[-3000:]
    assert "resumed from global_step2" in (logs / "third.log").read_text()
    _assert_same_losses(logs / "run", ref_losses)


def test_the_output_directory_is_respected(data, tmp_path):
    """A directory holding a user's files is refused, naming them, and left as it was; an empty
    training.output_dir is a configuration error."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    proc = _run(data, mine, "training.train_steps=2", nproc=1)
    assert proc.returncode != 0 and "is not a calm-dist run (it holds config.yaml)" in proc.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]
    assert (mine / "config.yaml").read_text() == "my own notes\n"

    proc = subprocess.run([sys.executable, "-m", "calm_dist.train", "--config", PRESET, *data, *TINY,
                           "training.output_dir=", "--dry-run"], capture_output=True, text=True,
                          env=child_env(), timeout=120)
    assert proc.returncode == 2 and "training.output_dir is empty" in proc.stderr


def test_sigusr1_to_the_ranks_saves_and_torchrun_exits_0(data, tmp_path):
    """The documented way (docs/training.md) to ask a torchrun job to stop: SIGUSR1 to torchrun's worker processes.
    Every rank saves after the same step and torchrun exits 0."""
    run = tmp_path / "run"
    launcher = subprocess.Popen(_command(data, run, "training.train_steps=10000", "training.save_interval=10000",
                                         "training.eval_steps=0"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    subprocess.run(["pkill", "-USR1", "-P", str(launcher.pid)], check=True)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, stderr[-3000:]
    assert stderr.count("received SIGUSR1") == 2
    step = int((run / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    meta = json.loads((run / "checkpoints" / f"global_step{step}" / "meta.json").read_text())
    assert step > 0 and meta["step"] == step


def test_a_hung_rank_fails_its_peer_after_the_collective_timeout(data, tmp_path):
    """A rank that stops answering (SIGSTOP, as a hung process or a dropped network looks to its
    peers) makes the other rank fail in its next collective after training.collective_timeout_minutes,
    not hang: the bound the SLURM docs promise."""
    run, timeout_s = tmp_path / "run", 15.0  # well above the skew between ranks while other tests load the cores
    launcher = subprocess.Popen(_command(data, run, "training.train_steps=10000", "training.save_interval=10000",
                                         "training.eval_steps=0", f"training.collective_timeout_minutes={timeout_s / 60}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        rank1 = [int(w) for w in workers if b"RANK=1\0" in Path(f"/proc/{w}/environ").read_bytes()]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)
        stopped = time.monotonic()
        failed = None
        for line in launcher.stderr:  # rank 0's error comes as the collective gives up
            if "imed out" in line:  # gloo: "Timed out waiting 6000ms for recv operation"
                failed = time.monotonic() - stopped
                break
        assert failed is not None, "rank 0 never reported a timed-out collective"
        assert timeout_s * 0.8 <= failed <= timeout_s + 30, failed
    finally:
        for pid in [launcher.pid, *map(int, subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                           text=True).stdout.split())]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()


def test_ranks_whose_torchrun_was_killed_exit_instead_of_running_on(data, tmp_path):
    """kill -9 of torchrun alone (a scheduler that kills a job by process group: torchrun's ranks run
    in sessions of their own and survive it): each rank notices it was orphaned and exits within
    seconds, rather than train on or hang in a collective beside the job's next incarnation."""
    run = tmp_path / "run"
    launcher = subprocess.Popen(_command(data, run, "training.train_steps=10000", "training.save_interval=10000",
                                         "training.eval_steps=0"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2, workers
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        while any(pid_alive(w) for w in workers) and time.monotonic() - killed < 20:
            time.sleep(0.1)
        gone = time.monotonic() - killed
        assert not any(pid_alive(w) for w in workers), "the orphaned ranks still run 20 s after their torchrun died"
        assert gone < 10, gone
        # One rank may fail first on its lost peer; at least one says why it went.
        assert "the launcher (torchrun, pid" in launcher.stderr.read()
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_at_a_random_moment(launcher: subprocess.Popen, checkpoints: Path, rng: random.Random, in_save: bool) -> bool:
    """kill -9 the launcher and its ranks: inside a save (a `.partial` directory exists) or at a
    random moment; False when the run finished first."""
    deadline = time.time() + (240 if in_save else rng.uniform(1.0, 12.0))
    while time.time() < deadline:
        if launcher.poll() is not None:
            return False
        if in_save and checkpoints.is_dir() and any(p.name.endswith(".partial") for p in checkpoints.iterdir()):
            break
        time.sleep(0.005)
    # torchrun starts each rank in a session of its own: kill them by pid, with the launcher.
    ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    for pid in [launcher.pid, *map(int, ranks)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    return True


@pytest.mark.slow
def test_repeated_kill_9_at_random_moments_ends_bit_identical(data, reference, tmp_path):
    """Ten kill -9 of the whole job (launcher and both ranks), half of them inside a save, each
    followed at once by the same command (the run lock of the killed run is taken over): the run
    completes and every loss it ever logged equals the uninterrupted run's, bit for bit."""
    _, ref_losses = reference
    run, rng, kills, in_save = tmp_path / "run", random.Random(0), 0, 0
    command = _command(data, run, *RUN[:1], "training.save_interval=1", "training.keep_last=2", "training.eval_steps=0")
    log = tmp_path / "launch.log"
    for _ in range(40):
        with open(log, "w") as stderr:
            launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
        if kills >= 10:
            launcher.wait(timeout=240)
            assert launcher.returncode == 0, log.read_text()[-4000:]
            break
        save_kill = kills % 2 == 0
        if _kill_at_a_random_moment(launcher, run / "checkpoints", rng, save_kill):
            kills += 1
            in_save += save_kill
        elif launcher.returncode == 0:
            # Finished before the kill: a fresh run directory keeps the kills coming.
            _assert_same_losses(run, ref_losses)
            shutil.rmtree(run)
    assert kills >= 10 and in_save >= 5
    _assert_same_losses(run, ref_losses)
    assert not any(p.name.endswith((".partial", ".damaged")) for p in (run / "checkpoints").iterdir())


def test_convert_names_non_finite_weights_and_damaged_converted_files(reference, tmp_path):
    """calm-convert on a checkpoint whose weights hold NaN says so (not "max |diff| nan"); a
    converted directory missing a file, or with a truncated model.safetensors, is named."""
    from calm_dist.convert.cli import main as convert_main
    from calm_dist.checkpoint.integrity import MANIFEST, file_sha256

    source, _ = reference
    run = tmp_path / "run"
    shutil.copytree(source, run)
    step = run / "checkpoints" / "global_step8"
    optim = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)  # our own test file
    with torch.no_grad():
        state["optimizer_state_dict"]["fp32_flat_groups"][0][3] = float("nan")
    torch.save(state, optim)
    manifest = json.loads((step / MANIFEST).read_text())  # a NaN that was *saved*, as an older version could
    manifest["files"][optim.name] = {"bytes": optim.stat().st_size, "sha256": file_sha256(optim)}
    (step / MANIFEST).write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "convert", str(run), str(tmp_path / "nan")],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2 and "non-finite values" in proc.stderr and "--tag" in proc.stderr, proc.stderr
    assert not (tmp_path / "nan").exists()

    converted = tmp_path / "converted"
    assert convert_main(["convert", str(run), str(converted), "--tag", "global_step6"]) == 0
    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "inspect", str(converted)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2 and f"{weights} is truncated or not a safetensors file" in proc.stderr
    weights.unlink()
    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "inspect", str(converted)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2 and f"{weights} is missing" in proc.stderr, proc.stderr
