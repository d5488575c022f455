"""Device telemetry for the metrics line: NVML readings (utilisation, memory, power, temperature)
and the process's own memory high-water marks.

Nothing here raises on a machine without a GPU: NVML is probed once, and without it (no driver
library: `NVMLError_LibraryNotFound`) `GpuTelemetry.available` is False, `.note` says
why and `.sample()` returns {}. NVML is shut down only if it was initialised.
"""

from __future__ import annotations

import os
from typing import Any

import psutil  # a DeepSpeed dependency
import torch

_GIB = 1024**3


class GpuTelemetry:
    """NVML readings of one GPU per call. Probe once per process (construction), sample each log
    interval, `close()` at the end."""

    def __init__(self) -> None:
        self.available = False
        self.note = ""
        self._nvml: Any = None
        self._handles: dict[int, Any] = {}
        try:
            import pynvml  # lazy: optional; the note says when it is missing
        except ImportError:
            self.note = "no GPU telemetry: nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            self.note = "no GPU telemetry: NVML library not found (no NVIDIA driver on this machine)"
            return
        except pynvml.NVMLError as e:  # a driver library but no usable GPU, permissions, ...
            self.note = f"no GPU telemetry: NVML did not initialise ({e})"
            return
        self._nvml = pynvml
        self.available = True
        try:
            count, driver = pynvml.nvmlDeviceGetCount(), pynvml.nvmlSystemGetDriverVersion()
            self.note = f"GPU telemetry: NVML, {count} device(s), driver {driver}"
        except pynvml.NVMLError as e:
            self.note = f"GPU telemetry: NVML ({e} while listing devices)"

    def sample(self, device_index: int) -> dict[str, float]:
        """Readings of CUDA device `device_index` (as torch numbers it); {} without NVML. A reading
        the device does not support (power on some boards) is left out."""
        if not self.available:
            return {}
        nvml = self._nvml
        try:
            handle = self._handle(device_index)
        except nvml.NVMLError:
            return {}
        readings = {
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu_mem_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / _GIB,
            "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # mW
            "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        }
        out: dict[str, float] = {}
        for key, read in readings.items():
            try:
                out[key] = float(read())
            except nvml.NVMLError:
                pass
        return out

    def _handle(self, device_index: int) -> Any:
        """NVML numbers all GPUs of the node, torch only the visible ones (CUDA_VISIBLE_DEVICES):
        map through the device UUID when torch knows it, else through the visible-device list."""
        if device_index not in self._handles:
            nvml = self._nvml
            uuid = _cuda_uuid(device_index)
            if uuid is not None:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            else:
                handle = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(device_index))
            self._handles[device_index] = handle
        return self._handles[device_index]

    def close(self) -> None:
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self.available = False
            self._handles.clear()

    def __enter__(self) -> "GpuTelemetry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cuda_uuid(device_index: int) -> str | None:
    try:
        uuid = torch.cuda.get_device_properties(device_index).uuid
    except (AttributeError, AssertionError, RuntimeError):
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _nvml_index(device_index: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if all(v.strip().isdigit() for v in visible) and device_index < len(visible):
        return int(visible[device_index])
    return device_index


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory high-water marks of this process. CUDA: max allocated and max reserved GiB and the
    reserved share of the device in %. Otherwise: the process's resident set size (RSS) in GiB."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.max_memory_reserved(device)
        return {
            "mem_alloc_gib": torch.cuda.max_memory_allocated(device) / _GIB,
            "mem_reserved_gib": reserved / _GIB,
            "mem_pct": 100.0 * reserved / total,
        }
    return {"mem_rss_gib": psutil.Process().memory_info().rss / _GIB}
