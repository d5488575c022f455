"""What this machine offers calm-dist, said once at start-up.

GPU-only dependencies (flash-attn, Transformer Engine, NVIDIA apex, NVML) are optional: each is
probed, and the report says which backend is used instead when one is missing.
"""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, OSError):  # CPU builds of CUDA packages fail with OSError too
        return False
    return True


def nvml_available() -> bool:
    """True when NVIDIA's management library answers (GPU telemetry); never raises."""
    try:
        import pynvml  # lazy: optional; the report says when NVML is missing
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def backend_report() -> dict[str, str]:
    """One line per optional capability, with what is used when it is absent."""
    cuda = torch.cuda.is_available()
    apex = _has("apex.optimizers") and _has("apex.normalization")
    return {
        "torch": f"{torch.__version__} ({'CUDA ' + str(torch.version.cuda) if cuda else 'CPU only'})",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "flash_attn": "installed" if _has("flash_attn") and cuda else "not usable (sdpa is used instead)",
        "transformer_engine": "installed" if _has("transformer_engine.pytorch") and cuda else "not usable",
        "apex": "fused optimizer and norms" if apex else "not installed (torch AdamW and torch norms)",
        "nvml": "GPU telemetry on" if nvml_available() else "no GPU telemetry (NVML not available)",
        "megatron_cpu_compat": "off (CUDA present)" if cuda else "on (megatron-core runs on CPU)",
    }


def log_backend_report() -> None:
    for name, value in backend_report().items():
        logger.info("%-20s %s", name, value)


def main() -> None:
    for name, value in backend_report().items():
        print(f"{name:20s} {value}")


if __name__ == "__main__":
    main()
