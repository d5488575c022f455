"""Scaling-law sweeps (calm_dist/sweep, docs/sweeps.md): the power-law fit, sweep-file errors,
plan names, SLURM array submission (dry run and a stand-in sbatch) and a real 4-point local sweep
of tiny baselines, collected to CSV and fitted with a PNG plot."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from calm_dist.config import load_config, validate
from calm_dist.sweep.cli import main
from calm_dist.sweep.collect import COLUMNS
from calm_dist.sweep.fit import fit_power_law
from calm_dist.sweep.plan import build_points
from calm_dist.sweep.spec import SweepError, load_spec
from tests.dist_utils import REPO_ROOT
from tests.train_utils import TINY, prepared_corpus_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _write(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _k_sweep(tmp_path: Path) -> dict:
    """CALM at K = 4 and 8 (autoencoder stand-ins: plan only checks they exist) and the baseline."""
    for k in (4, 8):
        (tmp_path / f"ae_k{k}").mkdir(exist_ok=True)
    return {
        "name": "ksweep", "base": ["tiny_calm"], "overrides": TINY,
        "sizes": {"s": {"hidden_size": 64, "num_layers": 2}, "m": {"model.hidden_size": 128, "model.num_layers": 2}},
        "autoencoders": {4: "ae_k4", 8: "ae_k8"},
        "axes": {"stage": ["calm", "baseline"], "patch_size": [4, 8], "model": ["s", "m"],
                 "tokens": ["2k", 4096], "lr": [1e-3, 3e-4]},
        "slurm": {"sbatch_args": ["--partition=debug", "--time=00:10:00"]},
    }


# ---- the fit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("b_true, noise", [(-0.05, 0.01), (0.12, 0.03), (-0.3, 0.05)])
def test_fit_recovers_known_exponent(b_true, noise):
    rng = np.random.default_rng(7)
    c = np.geomspace(1e17, 1e21, 16)
    y = 3.0 * c ** b_true * np.exp(rng.normal(0, noise, c.size))
    fit = fit_power_law(c, y, "synthetic")
    # The standard error matches the noise level it came from (sigma / sqrt(Sxx)), not silly.
    expected_se = noise / math.sqrt(((np.log(c) - np.log(c).mean()) ** 2).sum())
    assert expected_se / 3 < fit.se_b < expected_se * 3
    assert abs(fit.b - b_true) < 3 * fit.se_b
    assert fit.ci_low < b_true < fit.ci_high and fit.ci_high - fit.ci_low < 8 * fit.se_b
    assert abs(math.log(fit.a) - math.log(3.0)) < 3 * fit.se_b * abs(np.log(c)).max()
    exact = fit_power_law(c, 2.0 * c ** b_true, "exact")
    assert exact.b == pytest.approx(b_true, abs=1e-9) and exact.a == pytest.approx(2.0, rel=1e-6)


def test_fit_cli_groups_per_k_and_baseline(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows, truth = [], {"baseline": -0.08, "4": -0.11}
    for group, b in truth.items():
        for i, c in enumerate(np.geomspace(1e15, 1e19, 8)):
            rows.append({"name": f"{group}{i}", "stage": "baseline" if group == "baseline" else "calm",
                         "K": "" if group == "baseline" else group, "flops": c, "state": "finished",
                         "eval_loss": 50 * c ** b * math.exp(rng.normal(0, 0.02)), "brierlm": ""})
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["fit", str(path), "--metric", "loss", "--json", str(tmp_path / "f.json"),
                 "--plot", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "CALM K=4" in out and "SE" in out and "bootstrap" in out
    fits = {f["group"]: f for f in json.loads((tmp_path / "f.json").read_text())}
    assert abs(fits["baseline"]["b"] - truth["baseline"]) < 3 * fits["baseline"]["se_b"]
    assert abs(fits["CALM K=4"]["b"] - truth["4"]) < 3 * fits["CALM K=4"]["se_b"]
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC
    # The default metric is BrierLM: here it is blank everywhere, so no fit and a nonzero exit.
    assert main(["fit", str(path)]) == 1


# ---- sweep files and plans ---------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (lambda s: s["axes"].update({"depth": [2, 4]}), "axis 'depth': unknown axis"),
    (lambda s: s["axes"].update({"lr": []}), "empty grid"),
    (lambda s: s.update({"axes": {}}), "empty grid"),
    (lambda s: s["axes"].update({"model": ["xl"]}), "not defined under 'sizes:'"),
    (lambda s: s["axes"].update({"override:data.seed": [1, 2]}), "fixed across a sweep"),
    # K=2 is refused by the config validation (CALM needs K >= 4): named with its point.
    (lambda s: (s["axes"].update({"patch_size": [4, 2]}), s["autoencoders"].update({2: "ae_k4"})),
     "point (stage=calm, patch_size=2"),
    (lambda s: s["axes"].update({"patch_size": [4, 16]}), "no autoencoder for K=16"),
    # heads that do not divide the width: config validation, reported per point
    (lambda s: s["sizes"]["m"].update({"num_attention_heads": 3}), "fails validation"),
])
def test_bad_sweep_files_fail_before_writing(tmp_path, capsys, change, message):
    sweep = _k_sweep(tmp_path)
    change(sweep)
    path = _write(tmp_path / "bad.yaml", sweep)
    assert main(["plan", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_plan_names_encode_hyperparameters(tmp_path, capsys):
    path = _write(tmp_path / "k.yaml", _k_sweep(tmp_path))
    assert main(["plan", str(path), "--out", str(tmp_path / "sw")]) == 0
    plan = json.loads((tmp_path / "sw" / "plan.json").read_text())
    names = plan["points"]
    # calm: 2 K x 2 sizes x 2 token budgets x 2 lr; the baseline has no K: 2 x 2 x 2
    assert len(names) == len(set(names)) == 16 + 8
    assert "calm_K8_d128_L2_tok4.1k_lr3e-4" in names and "baseline_d64_L2_tok2.05k_lr1e-3" in names
    data = {"data": set(), "seed": set()}
    for name in names:
        point = json.loads((tmp_path / "sw" / name / "point.json").read_text())
        cfg = validate(load_config([tmp_path / "sw" / name / "config.yaml"]))
        assert cfg.training.output_dir == str((tmp_path / "sw" / name).resolve())
        assert point["tokens"] == cfg.training.train_steps * cfg.derived.tokens_per_step >= point["tokens_requested"]
        assert f"d{cfg.model.hidden_size}_L{cfg.model.num_layers}_" in name
        if point["stage"] == "calm":
            k = cfg.model.patch_size
            assert name.startswith(f"calm_K{k}_") and point["K"] == k
            assert cfg.model.latent_size == cfg.autoencoder.latent_size == 32 * k == 32 * cfg.autoencoder.patch_size
            assert cfg.training.autoencoder_path == str((tmp_path / f"ae_k{k}").resolve())
        data["seed"].add((cfg.data.seed, cfg.training.seed))
        assert point["params"] > 0 and point["flops_per_token"] > 0
    assert len(data["seed"]) == 1
    # planning again is a no-op; a different plan into the same directory is refused
    assert main(["plan", str(path), "--out", str(tmp_path / "sw")]) == 0
    sweep = _k_sweep(tmp_path)
    sweep["axes"]["lr"] = [1e-3]
    assert main(["plan", str(_write(tmp_path / "k2.yaml", sweep)), "--out", str(tmp_path / "sw")]) == 2
    assert "different plan" in capsys.readouterr().err


def test_slurm_dry_run_prints_the_array_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path / "k.yaml", _k_sweep(tmp_path))
    assert main(["plan", str(path), "--out", str(tmp_path / "sw")]) == 0
    capsys.readouterr()
    before = _listing(tmp_path)
    monkeypatch.setenv("PATH", "")  # no sbatch needed for a dry run
    assert main(["submit", str(tmp_path / "sw"), "--slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    sw = (tmp_path / "sw").resolve()
    assert (f"sbatch --parsable --array=0-23 --job-name=sweep-ksweep --output={sw}/slurm-%A_%a.out "
            f"--signal=B:USR1@600 --requeue --open-mode=append --partition=debug --time=00:10:00 {sw}/sweep_array.sbatch") in out
    assert 'point="${POINTS[$SLURM_ARRAY_TASK_ID]}"' in out and "calm_K4_d64_L2_tok2.05k_lr1e-3" in out
    assert _listing(tmp_path) == before
    # without --dry-run and without sbatch: a clear error, nothing written
    assert main(["submit", str(tmp_path / "sw"), "--slurm"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_slurm_submit_records_jobs_and_never_resubmits(tmp_path, capsys, monkeypatch):
    sweep = _k_sweep(tmp_path)
    sweep["axes"] = {"stage": ["baseline"], "model": ["s", "m"]}
    assert main(["plan", str(_write(tmp_path / "b.yaml", sweep)), "--out", str(tmp_path / "sw")]) == 0
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # a stand-in: records its arguments, answers with a job id
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "4242;cluster"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    squeue = bin_dir / "squeue"  # the queue as SLURM would report it after the submission
    squeue.write_text('#!/bin/sh\nprintf "4242_0|PENDING\\n4242_1|RUNNING\\n"\n')
    squeue.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["submit", str(tmp_path / "sw"), "--slurm"]) == 0
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[0].startswith("--test-only --array=0-1 ")
    assert calls[1].startswith("--parsable --array=0-1 ")
    script = (tmp_path / "sw" / "sweep_array.sbatch").read_text()
    assert "-m calm_dist.train --config" in script or "train.sbatch --config" in script
    jobs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sw").glob("*/job.json"))]
    assert sorted(j["job_id"] for j in jobs) == ["4242_0", "4242_1"]
    capsys.readouterr()
    assert main(["status", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert "submitted  step 0/2000  job 4242_0" in out and "running    step 0/2000  job 4242_1" in out
    assert main(["submit", str(tmp_path / "sw"), "--slurm"]) == 0
    assert "nothing to submit" in capsys.readouterr().out and len(log.read_text().splitlines()) == 2
    assert main(["submit", str(tmp_path / "sw"), "--slurm", "--force"]) == 0
    assert len(log.read_text().splitlines()) == 4


# ---- a real local sweep ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """4 tiny baselines (2 sizes x 2 token budgets: 3 and 6 steps of 256 tokens), trained locally."""
    tmp = tmp_path_factory.mktemp("sweep")
    data = prepared_corpus_overrides(tmp / "data")
    sweep = {"name": "tiny", "base": ["tiny_baseline"],
             "overrides": [*data, *TINY, "training.eval_steps=2", "training.save_interval=100"],
             "sizes": {"a": {"hidden_size": 32, "num_layers": 1}, "b": {"hidden_size": 64, "num_layers": 2}},
             "axes": {"model": ["a", "b"], "tokens": [768, 1536]}}
    path = _write(tmp / "tiny.yaml", sweep)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["plan", str(path), "--out", str(tmp / "sw")]) == 0
        code = main(["submit", str(tmp / "sw"), "--local"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    logs = "\n".join(p.read_text()[-2000:] for p in (tmp / "sw").glob("*/train.log"))
    assert code == 0, logs
    return tmp


def test_local_sweep_collect_fit_and_no_rerun(local_sweep, capsys):
    sw = local_sweep / "sw"
    names = json.loads((sw / "plan.json").read_text())["points"]
    assert sorted(names) == ["baseline_d32_L1_tok1.54k_lr1e-3", "baseline_d32_L1_tok768_lr1e-3",
                             "baseline_d64_L2_tok1.54k_lr1e-3", "baseline_d64_L2_tok768_lr1e-3"]
    capsys.readouterr()
    assert main(["status", str(sw)]) == 0
    assert capsys.readouterr().out.count("finished   step") == 4
    assert main(["collect", str(sw), "--out", str(sw / "results.csv")]) == 0
    with open(sw / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS and len(rows) == 4
    for row in rows:
        assert row["state"] == "finished" and row["stage"] == "baseline"
        assert int(row["step"]) == int(row["train_steps"]) in (3, 6)
        assert int(row["tokens"]) == 256 * int(row["step"])
        assert float(row["flops"]) == pytest.approx(float(row["flops_per_token"]) * int(row["tokens"]), rel=1e-5)
        assert float(row["train_loss"]) > 0 and float(row["eval_loss"]) > 0 and row["brierlm"] != ""
    assert main(["fit", str(sw / "results.csv"), "--metric", "loss", "--plot", str(sw / "frontier.png")]) == 0
    assert (sw / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    # Rerunning never retrains a finished point.
    before = {n: (sw / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
    capsys.readouterr()
    assert main(["submit", str(sw), "--local"]) == 0
    out = capsys.readouterr().out
    assert out.count("skip") == 4 and "nothing to run" in out
    assert before == {n: (sw / n / "metrics.jsonl").stat().st_mtime_ns for n in names}


def test_spec_reads_token_suffixes(tmp_path):
    sweep = _k_sweep(tmp_path)
    sweep["axes"] = {"stage": ["baseline"], "tokens": ["2k", "1.5M", 1e6]}
    spec = load_spec(_write(tmp_path / "t.yaml", sweep))
    assert spec.axes["tokens"] == [2000, 1500000, 1000000]
    assert len(build_points(spec, tmp_path / "x")) == 3 and not (tmp_path / "x").exists()
    with pytest.raises(SweepError, match="token count"):
        sweep["axes"]["tokens"] = ["lots"]
        load_spec(_write(tmp_path / "t.yaml", sweep))
