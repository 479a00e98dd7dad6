"""`wanbox doctor`'s attention-kernel check: says which kernel the worker can use, warns where FA3 would help."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.doctor import Check, check_attention

H200 = Check("GPUs", "ok", "1: NVIDIA H200, 143771 MiB, 0 MiB")
A100 = Check("GPUs", "ok", "1: NVIDIA A100-SXM4-80GB, 81920 MiB, 0 MiB")


def config(tmp_path: Path, device: str):
    return parse_config({"pool": {"device": device}}, root=tmp_path)


@pytest.fixture
def fa3_installed(monkeypatch: pytest.MonkeyPatch):
    """Pretend the FlashAttention-3 module exists (it builds only on a CUDA host), without importing anything."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name == "flash_attn_interface":
            return importlib.machinery.ModuleSpec(name, None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture
def fa3_missing(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "flash_attn_interface" else real(name, *a, **k))


def test_a_hopper_gpu_without_flashattention3_is_a_warning_that_says_how_to_fix_it(tmp_path, fa3_missing) -> None:
    check = check_attention(config(tmp_path, "cuda"), H200)
    assert check.status == "warn"
    assert "cuDNN" in check.detail and "Faster attention on Hopper" in check.detail


def test_flashattention3_found_is_ok_and_named(tmp_path, fa3_installed) -> None:
    check = check_attention(config(tmp_path, "cuda"), H200)
    assert check.status == "ok" and "FlashAttention-3 found" in check.detail


def test_other_gpus_and_the_cpu_need_nothing(tmp_path, fa3_missing) -> None:
    assert check_attention(config(tmp_path, "cuda"), A100).status == "ok"
    assert check_attention(config(tmp_path, "cuda"), Check("GPUs", "fail", "nvidia-smi not found")).status == "ok"
    cpu = check_attention(config(tmp_path, "cpu"), H200)
    assert cpu.status == "ok" and "CPU" in cpu.detail


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.weights.tiny import write_i2v

    return write_i2v(tmp_path_factory.mktemp("ckpt") / "i2v", seed=1)


def test_model_load_says_how_much_ram_the_weights_need(tmp_path, tiny_i2v, monkeypatch) -> None:
    from daemon import doctor
    from pipeline.weights.layouts import required_files

    cfg = parse_config({"pool": {"checkpoint_dirs": {"i2v-A14B": str(tiny_i2v)}}}, root=tmp_path)
    size_gib = sum((tiny_i2v / rel).stat().st_size for rel in required_files("i2v-A14B", tiny_i2v)) / 2**30
    monkeypatch.setattr(doctor, "_meminfo_gib", lambda: {"MemTotal": 8.0, "MemAvailable": 4.0})
    (small,) = doctor.check_model_load(cfg)  # animate-14B is not installed: check_models reports that
    assert small.name == "model i2v-A14B load" and small.status == "warn"
    assert f"reads {size_gib:.1f} GiB" in small.detail and "cannot cache" in small.detail
    assert f"needs ~{size_gib + doctor.PAGE_CACHE_HEADROOM_GIB:.0f} GiB" in small.detail
    monkeypatch.setattr(doctor, "_meminfo_gib", lambda: {"MemTotal": 512.0, "MemAvailable": 400.0})
    (large,) = doctor.check_model_load(cfg)
    assert large.status == "ok" and "page cache" in large.detail


def test_model_load_skips_what_is_not_installed(tmp_path) -> None:
    from daemon.doctor import check_model_load

    assert check_model_load(parse_config({}, root=tmp_path)) == []
