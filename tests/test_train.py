"""The trainer, end to end through its command line: real DeepSpeed ZeRO-3, 1 and 2 CPU ranks.

Each multi-rank run is `torchrun ... -m calm_dist.train` in a subprocess (fresh process groups);
a tiny model and a small prepared corpus keep each run to a few seconds of compute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calm_dist.checkpoint.saved_layout import layout_of
from calm_dist.common.processes import kill_process_tree
from calm_dist.training.golden import run_losses as losses
from tests.dist_utils import REPO_ROOT, free_port
from tests.train_utils import TINY, child_env, prepared_corpus_overrides, train, train_command


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Overrides pointing at a small prepared corpus (512-token BPE, 30 speeches)."""
    return prepared_corpus_overrides(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def autoencoder(data, tmp_path_factory):
    """Stage 1 with 2 ranks: trains, checkpoints, and exports the autoencoder for stage 2."""
    out = tmp_path_factory.mktemp("ae")
    # The job log as a user gets it: the trainer's own warning policy, not the tests' PYTHONWARNINGS.
    env = {k: v for k, v in child_env().items() if k != "PYTHONWARNINGS"}
    proc = train(data, "tiny_autoencoder", out, "training.train_steps=6", "training.save_interval=3",
                 "training.eval_interval=3", nproc=2, env=env)
    job_log(out).write_text(proc.stdout + proc.stderr)  # beside the run directory, not in it
    return out


def job_log(run: Path) -> Path:
    return run.with_name(run.name + ".job.log")


def test_autoencoder_stage_on_two_ranks_partitions_and_exports(autoencoder):
    run = autoencoder
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step6"
    states = [torch.load(ckpt / "global_step6" / f"rank_{r:05d}.pt", weights_only=True) for r in (0, 1)]
    total = states[0]["params_total"]
    for state in states:  # ZeRO-3: each rank holds about half of the parameters
        assert abs(state["params_local"] / total - 0.5) < 0.01, (state["params_local"], total)
    meta = json.loads((ckpt / "global_step6" / "meta.json").read_text())
    assert layout_of(meta)["world_size"] == 2 and layout_of(meta)["zero_stage"] == 3
    assert meta["train_state"]["tokens"] == 6 * 8 * 64  # global batch 2 ranks x 4, 64 tokens each
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals and 0.0 <= evals[-1]["recon_acc"] <= 1.0
    assert (run / "autoencoder" / "model.safetensors").is_file() and (run / "ds_config.json").is_file()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_a_two_rank_job_log_says_its_layout_and_names_rank_and_host_on_every_line(autoencoder):
    """What a person reads: the job's layout first, each of our lines with its rank and host, no
    known-harmless library warning (missing Apex / Transformer Engine, torch's deprecation of the
    collectives DeepSpeed calls) and no library warning twice."""
    lines = job_log(autoencoder).read_text().splitlines()
    ours = [line for line in lines if re.match(r"\d\d:\d\d:\d\d \[", line)]
    assert ours and all(re.match(r"\d\d:\d\d:\d\d \[rank[01]@[\w.-]+\] ", line) for line in ours), ours[:5]
    assert "calm_dist.train: job: 2 rank(s) on 1 node(s)" in ours[0]
    assert "stage autoencoder, regime zero3 (TP 1 x PP 1 x DP 2, ZeRO-3); backend gloo on cpu" in ours[0]
    assert f"checkpoints -> {autoencoder.resolve() / 'checkpoints'}" in ours[0]
    assert "ZeRO-3 on one rank" not in "\n".join(ours)  # two ranks: ZeRO-3 partitions, no advice
    text = "\n".join(lines)
    assert "is not installed" not in text and "are not installed" not in text
    assert "FutureWarning" not in text and "DeprecationWarning" not in text
    warnings_seen = [line.split("Warning: ", 1)[1] for line in lines if "Warning: " in line]
    assert len(warnings_seen) == len(set(warnings_seen)), warnings_seen
    progress = [line for line in lines if "| loss " in line]  # the step and eval lines
    assert progress and all(re.match(r"\[rank0@[\w.-]+\] (eval  )?step \d+/\d+ ", line) for line in progress), progress
    assert not any("[rank1@" in line and "MFU" in line for line in lines)  # a job's note, said once


def test_zero3_on_one_rank_is_advised_toward_the_3d_regime():
    """ZeRO-3 partitions nothing on one rank but still costs its hooks: the job log says so and
    names the faster regime; nothing is said where ZeRO-3 partitions or another regime runs."""
    from calm_dist.config import load_config, validate
    from calm_dist.train import regime_advice

    one_rank = validate(load_config(["tiny_baseline"]), world_size=1)
    assert "parallel.regime=3d" in regime_advice(one_rank, world_size=1)
    assert regime_advice(validate(load_config(["tiny_baseline"]), world_size=2), world_size=2) is None
    three_d = validate(load_config(["tiny_baseline"], ["parallel.regime=3d", "parallel.zero_stage=0"]), world_size=1)
    assert regime_advice(three_d, world_size=1) is None
    stage1 = validate(load_config(["tiny_baseline"], ["parallel.zero_stage=1"]), world_size=1)
    assert regime_advice(stage1, world_size=1) is None


@pytest.mark.parametrize("stage", ["calm", "baseline"])
def test_language_model_stages_on_two_ranks(data, autoencoder, tmp_path, stage):
    out = tmp_path / stage
    train(data, f"tiny_{stage}", out, "training.train_steps=4", "training.save_interval=4",
          "training.eval_interval=4", f"training.autoencoder_path={autoencoder / 'autoencoder'}", nproc=2)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    final = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l][-1]
    assert {"brier1", "brier4", "brierlm", "loss"} <= set(final)
    if stage == "baseline":
        assert final["ppl"] > 1


def test_how_often_calm_evaluates_does_not_change_its_training(data, autoencoder, tmp_path):
    """CALM's evaluation draws noise (head samples, BrierLM rollouts) from its own seeded streams:
    evaluating at every step or never gives the same training losses, bit for bit."""
    common = ["training.train_steps=3", "training.save_interval=3", "optimizer.warmup_steps=0",
              f"training.autoencoder_path={autoencoder / 'autoencoder'}"]
    train(data, "tiny_calm", tmp_path / "every", *common, "training.eval_interval=1")
    train(data, "tiny_calm", tmp_path / "never", *common, "training.eval_steps=0")
    every, never = losses(tmp_path / "every"), losses(tmp_path / "never")
    assert sorted(every) == [1, 2, 3] and every == never
    assert sum('"eval"' in line for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()) == 3


def test_kill_and_resume_gives_the_same_losses_bit_for_bit(data, autoencoder, tmp_path):
    common = ["training.train_steps=30", "training.save_interval=4", "training.eval_steps=0",
              f"training.autoencoder_path={autoencoder / 'autoencoder'}"]
    straight = tmp_path / "straight"
    train(data, "tiny_calm", straight, *common, nproc=2)
    reference = losses(straight)

    killed = tmp_path / "killed"
    args = [*train_command(2), "--config", "tiny_calm", *data, *TINY, f"training.output_dir={killed}", *common]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
                            start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() not in ("", "global_step4"):
            break  # at least two checkpoints written: kill mid-run
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    kill_process_tree(proc.pid)  # the ranks too, as a node crash would: torchrun runs them in sessions of their own
    proc.wait()
    resumed_from = int(latest.read_text().strip().removeprefix("global_step"))
    assert resumed_from < 30

    train(data, "tiny_calm", killed, *common, nproc=2)  # auto-resume from `latest`
    after = losses(killed)
    assert sorted(after) == list(range(1, 31))
    for step in range(resumed_from + 1, 31):
        assert after[step] == reference[step], (step, after[step], reference[step])


def test_sigterm_to_one_rank_saves_and_both_exit_cleanly(data, autoencoder, tmp_path):
    import psutil

    out = tmp_path / "sigterm"
    args = [*train_command(2), "--config", "tiny_baseline", *data, *TINY, f"training.output_dir={out}",
            "training.train_steps=100000", "training.save_interval=100000", "training.eval_steps=0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    # The two ranks are torchrun's direct children (a rank's own short-lived forks are not ranks).
    workers = [p for p in psutil.Process(proc.pid).children(recursive=False) if "calm_dist.train" in " ".join(p.cmdline())]
    assert len(workers) == 2, workers
    workers[-1].send_signal(signal.SIGTERM)  # like a pre-emption notice reaching one task first
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("global_step"))
    assert 3 <= step < 100000
    assert "SIGTERM" in stdout + stderr


def test_mismatched_config_is_refused_naming_the_field(data, autoencoder, tmp_path):
    out = tmp_path / "run"
    train(data, "tiny_autoencoder", out, "training.train_steps=2", "training.eval_steps=0")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = train(data, "tiny_autoencoder", out, "training.train_steps=4", "training.eval_steps=0",
                 "autoencoder.hidden_size=32", "autoencoder.intermediate_size=80", check=False)
    assert proc.returncode == 2
    assert "autoencoder.hidden_size" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched


def test_bad_input_fails_before_training_with_clear_errors(data, tmp_path):
    from calm_dist.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    base = ["--config", "tiny_autoencoder", *data, *TINY, f"training.output_dir={out}"]
    # A batch that does not divide (validated for the launcher's world size, before any compute).
    assert main(base + ["training.global_batch_size=6", "training.micro_batch_size=4"]) == 2
    # A DeepSpeed preset with an unknown key.
    preset = tmp_path / "bad.json"
    preset.write_text(json.dumps({"zero_optimization": {"stage": 3}, "zero_optimisation_typo": 1}))
    assert main(base + [f"parallel.ds_preset={preset}"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # A missing data path (a subprocess: it is found after the process group starts). A refused
    # run leaves no trace. (A directory with a user's files is refused: tests/test_faults.py.)
    fresh = tmp_path / "fresh"
    proc = train(data, "tiny_autoencoder", fresh, f"data.train_path={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2 and "nowhere" in proc.stderr
    assert not fresh.exists()


def test_calm_stage_needs_a_trained_autoencoder(data, tmp_path):
    proc = train(data, "tiny_calm", tmp_path / "calm", "training.train_steps=2", check=False)
    assert proc.returncode == 2 and "training.autoencoder_path" in proc.stderr


GOLDEN = REPO_ROOT / "tests" / "golden" / "tiny_baseline.json"


def test_tiny_run_reproduces_the_golden_losses(data, tmp_path):
    """The tiny CPU config (single process, fixed seeds) against tests/golden/tiny_baseline.json.
    Regenerate deliberately with CALM_UPDATE_GOLDEN=1 (and say why in the commit)."""
    from calm_dist.training.golden import compare_losses, write_golden

    out = tmp_path / "golden"
    train(data, "tiny_baseline", out, "training.train_steps=8", "training.eval_steps=0")
    if os.environ.get("CALM_UPDATE_GOLDEN") == "1":
        write_golden(out, GOLDEN, "tiny_baseline + tests/test_train.py TINY overrides, 8 steps, 1 CPU process")
    problems = compare_losses(out, GOLDEN, rtol=1e-3)
    assert not problems, problems


def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(data, tmp_path):
    """A learning rate of 1e30 blows the autoencoder's log-sigma up after the first update, so its
    KL term overflows: every later loss is non-finite and skipped, and after max_bad_steps the run
    stops with exit 1 and a checkpoint."""
    out = tmp_path / "diverge"
    proc = train(data, "tiny_autoencoder", out, "optimizer.lr=1e30", "optimizer.warmup_steps=0",
                 "training.max_bad_steps=3", "training.train_steps=20", "training.eval_steps=0", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr and "3 non-finite losses or gradients in a row" in proc.stderr
    tag = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / tag / "meta.json").read_text())
    assert meta["train_state"]["skipped_batches"] == 3 and meta["train_state"]["step"] >= 1


def test_the_deepspeed_launcher_works_too(data, tmp_path):
    out = tmp_path / "ds_launcher"
    args = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "calm_dist.train",
            "--config", "tiny_baseline", *data, *TINY, f"training.output_dir={out}", "training.train_steps=2",
            "training.eval_steps=0"]
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), *args[1:]], capture_output=True, text=True, env=child_env(), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((out / "checkpoints" / "global_step2" / "meta.json").read_text())
    assert layout_of(meta)["world_size"] == 2


def test_single_process_resume_is_bit_exact(data, tmp_path):
    """One process, no launcher: stopping after 3 steps and resuming gives the uninterrupted losses
    (the data loader must not draw from the restored global RNG)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["training.eval_steps=0", "training.save_interval=3", "optimizer.warmup_steps=0"]
    train(data, "tiny_autoencoder", straight, "training.train_steps=6", *common)
    train(data, "tiny_autoencoder", split, "training.train_steps=3", *common)
    train(data, "tiny_autoencoder", split, "training.train_steps=6", *common)
    reference, resumed = losses(straight), losses(split)
    assert sorted(resumed) == list(range(1, 7))
    assert all(resumed[s] == reference[s] for s in range(1, 7)), (resumed, reference)
