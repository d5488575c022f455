"""Rank-0 metrics (console line, JSONL, TensorBoard, optional W&B) and device telemetry on a CPU
machine."""

from __future__ import annotations

import json
import math
import sys

import pytest

from calm_dist.common.job_log import short_hostname
from calm_dist.config.schema import LoggingConfig
from calm_dist.training.metrics import MetricsLogger, format_metrics_line, is_interactive
from calm_dist.training.telemetry import GpuTelemetry, memory_stats

TRAIN = {
    "loss": 19.84, "fid": 10.01, "div": 0.18, "grad_norm": 0.91, "lr": 1e-3, "tok_per_s": 5210.4,
    "vec_per_s": 1302.6, "tflops": 0.8, "mfu": 12.3, "mem_alloc_gib": 1.2, "data_ms": 3.2,
}


def make_logger(tmp_path, rank=0, **cfg):
    fields = {"tensorboard": False, **cfg}
    return MetricsLogger(tmp_path / "run", LoggingConfig(**fields), rank=rank, world_size=2,
                         total_steps=2000, interactive=False)


def test_line_format_for_a_known_dict():
    assert format_metrics_line(120, 2000, TRAIN) == (
        "step 120/2000 | loss 19.84 (fid 10.01 div 0.18) | grad 0.91 | lr 1.0e-03 | 5,210 tok/s 1,303 vec/s"
        " | 0.8 TFLOP/s MFU 12.3% | mem 1.2 GiB | data 3 ms"
    )


def test_line_order_is_stable_and_skips_missing_values():
    shuffled = dict(reversed(list(TRAIN.items())))
    assert format_metrics_line(120, 2000, shuffled) == format_metrics_line(120, 2000, TRAIN)
    line = format_metrics_line(5, 10, {"loss": 2.5, "mfu": None, "zeta": 3, "alpha": 0.5, "tflops": 0.01})
    assert line == "step 5/10 | loss 2.5 | 0.01 TFLOP/s | alpha 0.5 zeta 3"
    evaluation = {"loss": 1.0, "brier1": 21.81, "brier2": 6.88, "brier3": 2.59, "brier4": 1.25,
                  "brierlm": 4.7012, "blocks": 12}
    assert format_metrics_line(250, 2000, evaluation) == (
        "step 250/2000 | loss 1 | brier1 21.81 brier2 6.88 brier3 2.59 brier4 1.25 | BrierLM 4.70 | blocks 12"
    )
    assert "loss nan" in format_metrics_line(1, 2, {"loss": math.nan})


def test_jsonl_lines_are_valid_and_complete(tmp_path, capsys):
    with make_logger(tmp_path) as log:
        log.log_train(10, TRAIN)
        log.log_train(20, {**TRAIN, "loss": math.nan})
        log.log_eval(20, {"loss": 1.5, "brierlm": 4.7})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert [(r["step"], r["kind"]) for r in records] == [(10, "train"), (20, "train"), (20, "eval")]
    for record, sent in zip(records, (TRAIN, TRAIN, {"loss": 1.5, "brierlm": 4.7})):
        assert set(record) == {"step", "kind", "time", "elapsed_s", *sent}
        assert record["time"] > 1e9 and record["elapsed_s"] >= 0
    assert records[0]["tok_per_s"] == TRAIN["tok_per_s"]
    assert records[1]["loss"] is None  # non-finite -> null
    out = capsys.readouterr().out.splitlines()
    prefix = f"[rank0@{short_hostname()}] "  # a job of 2 ranks: each line names its rank and host
    assert out[0].startswith(prefix + "step 10/2000 | loss 19.84") and out[2].startswith(prefix + "eval  step 20/2000")
    assert not any("\r" in line for line in out)  # plain lines: no progress bar in logs


def test_jsonl_appends_across_resumes(tmp_path):
    for step in (10, 20):
        with make_logger(tmp_path) as log:
            log.log_train(step, {"loss": 1.0})
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_only_rank_zero_writes(tmp_path, capsys):
    with make_logger(tmp_path, rank=1, tensorboard=True) as log:
        log.log_train(10, TRAIN)
        log.log_eval(10, {"loss": 1.0})
        log.note("hello")
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_reserved_names_are_refused(tmp_path):
    with make_logger(tmp_path) as log, pytest.raises(ValueError, match="reserved"):
        log.log_train(1, {"step": 3})


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    with make_logger(tmp_path, tensorboard=True) as log:
        log.log_train(10, TRAIN)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_optional_sinks_are_announced_not_fatal(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with make_logger(tmp_path, tensorboard=True, wandb=True) as log:
        log.log_train(10, {"loss": 1.0})
    out = capsys.readouterr().out
    assert "tensorboard package is not installed" in out and "wandb package is not installed" in out
    assert out.count("not installed") == 2
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_progress_bar_decision(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert is_interactive("auto", 1)
    assert not is_interactive("auto", 2)
    assert is_interactive("on", 2)
    assert not is_interactive("off", 1)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert not is_interactive("auto", 1)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # a log file: never a bar
    assert not is_interactive("on", 1)


def test_progress_bar_keeps_the_lines(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "run", LoggingConfig(tensorboard=False), 0, 1, 100, start_step=10,
                        interactive=True)
    log.progress(15)
    log.log_train(20, {"loss": 1.25})
    log.close()
    out = capsys.readouterr().out
    assert "step 20/100 | loss 1.25" in out and "20/100 [" in out  # the line, and the bar with its ETA


def test_telemetry_reports_what_the_machine_has_and_never_raises():
    telemetry = GpuTelemetry()
    if telemetry.available:  # a GPU machine: the four readings of device 0
        readings = telemetry.sample(0)
        assert readings and set(readings) <= {"gpu_util_pct", "gpu_mem_used_gib", "gpu_power_w", "gpu_temp_c"}
    else:  # no NVML (a CPU machine): a clear note, no readings
        assert "no GPU telemetry" in telemetry.note and "NVML library not found" in telemetry.note
        assert telemetry.sample(0) == {}
    telemetry.close()
    telemetry.close()


def test_memory_stats_on_cpu_is_rss():
    stats = memory_stats("cpu")
    assert set(stats) == {"mem_rss_gib"} and 0.01 < stats["mem_rss_gib"] < 64
    assert "rss" in format_metrics_line(1, 1, stats)
