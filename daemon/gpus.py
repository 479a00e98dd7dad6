"""Per-GPU utilisation and memory through NVML (nvidia-ml-py), for the heartbeat and the metrics.

Read-only and cheap (a few NVML calls per GPU); it must never raise: a host without an NVIDIA driver,
or a driver that fails, reports no GPUs and the daemon goes on. It must not import torch.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("wanbox.gpus")


class GpuProbe:
    """NVML's view of this host's GPUs; `read()` returns [] once NVML turned out to be unavailable."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] | None = None
        self.unavailable = ""  # why there are no readings (no library, no driver), once known

    def read(self) -> list[dict[str, Any]]:
        """One dict per GPU: index, name, uuid, utilization_percent, memory_used_bytes, memory_total_bytes."""
        if self.unavailable:
            return []
        try:
            handles = self._open()
            return [self._reading(index, handle) for index, handle in enumerate(handles)]
        except Exception as exc:  # NVMLError and its many subclasses; a broken driver must not stop the loop
            self._give_up(f"NVML failed: {exc}")
            return []

    def close(self) -> None:
        if self._handles is not None and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already gone: nothing to release
                log.debug("nvmlShutdown failed", exc_info=True)
        self._handles = None

    def _open(self) -> list[Any]:
        if self._handles is not None:
            return self._handles
        try:
            import pynvml
        except ImportError:
            self._give_up("nvidia-ml-py is not installed")
            return []
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # no driver (a CPU host): normal, said once at debug level
            self._give_up(f"no NVIDIA driver ({exc})", quiet=True)
            return []
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return self._handles

    def _reading(self, index: int, handle: Any) -> dict[str, Any]:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "index": index,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
            "utilization_percent": int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "memory_used_bytes": int(memory.used),
            "memory_total_bytes": int(memory.total),
        }

    def _give_up(self, why: str, quiet: bool = False) -> None:
        self.unavailable = why
        log.log(logging.DEBUG if quiet else logging.WARNING, "GPU readings unavailable: %s", why)
        self.close()


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value
