"""NVML readings: none (and no error) on a host without an NVIDIA driver; real ones on a GPU host."""

from __future__ import annotations

import pytest

from daemon.gpus import GpuProbe


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_nvml_works(), reason="this host has an NVIDIA driver")
def test_without_a_driver_there_are_no_readings_and_no_error() -> None:
    probe = GpuProbe()
    assert probe.read() == [] and probe.read() == []
    assert "driver" in probe.unavailable or "not installed" in probe.unavailable
    probe.close()


@pytest.mark.gpu
def test_nvml_reports_every_gpu_with_its_memory_and_utilisation() -> None:
    import torch

    probe = GpuProbe()
    try:
        readings = probe.read()
        assert len(readings) >= torch.cuda.device_count() >= 1, probe.unavailable
        for index, gpu in enumerate(readings):
            assert gpu["index"] == index and gpu["uuid"].startswith("GPU-") and gpu["name"]
            assert 0 <= gpu["utilization_percent"] <= 100
            assert 0 < gpu["memory_used_bytes"] <= gpu["memory_total_bytes"]
        x = torch.ones(256, 2**20, device="cuda")  # 1 GiB more on GPU 0: NVML must see it
        torch.cuda.synchronize()
        after = probe.read()[0]["memory_used_bytes"]
        assert after - readings[0]["memory_used_bytes"] >= 0.9 * 2**30
        del x
    finally:
        probe.close()
