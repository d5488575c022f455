"""The start-up report names a usable backend for every optional GPU dependency."""

import torch

from calm_dist.environment import backend_report, nvml_available


def test_report_covers_each_optional_dependency_without_raising():
    report = backend_report()
    assert set(report) >= {"torch", "flash_attn", "transformer_engine", "apex", "nvml", "megatron_cpu_compat"}
    if not torch.cuda.is_available():
        assert "sdpa" in report["flash_attn"]
        assert nvml_available() is False and "no GPU telemetry" in report["nvml"]
