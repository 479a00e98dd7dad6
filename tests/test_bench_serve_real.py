"""bench/bench_serve_real.py on the CPU (--tiny): the same steps as on the GPU — a checkpoint in the released
layout with the low-noise expert hard-linked, a LoRA in the library, a real `wanbox serve` with a preloaded
pool, a preset job and a LoRA job delivered — and its report says what the GPU run will be judged by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_tiny_run_delivers_the_preset_job_and_the_lora_job(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "bench/bench_serve_real.py", "--tiny", "--frames", "5", "--work",
                           str(tmp_path), "--out", str(out), "--timeout", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    report = json.loads(out.read_text())
    assert done.returncode == 0 and report["ok"], (report.get("error"), done.stderr[-3000:])
    assert report["checkpoint"]["low_noise_model"].startswith("hard links")
    assert report["checkpoint"]["shards_per_expert"] == 2 and report["pool"]["load_s"] > 0
    preset, lora = report["jobs"]["preset-4step"], report["jobs"]["lora-style"]
    for job in (preset, lora):
        assert job["state"] == "done" and job["decoded"]["frames"] == 5 and job["as_asked"]
        assert job["attention"] == "sdpa" and job["precision"] and job["timings_seconds"]["sampling"] > 0
    assert preset["sampling"]["preset"] == "lightning-4step" and preset["sampling"]["guide_scale"] == [1.0, 1.0]
    assert preset["loras"] == [] and preset["sampling"]["timesteps"] == [1000, 750, 500, 250]
    (applied,) = lora["loras"]
    assert applied["file"] == "attention_r16.safetensors" and applied["format"] == "original"
    assert applied["experts"] == ["high_noise", "low_noise"] and applied["strength"] == 0.8
    assert set(applied["method"]) == {"high_noise", "low_noise"} and len(applied["sha256"]) == 64
    assert lora["model_load"] is False  # the second job ran on the warm pool
    assert report["daemon_exit"] == 0 and (tmp_path / "report.daemon.log").is_file()
    assert not list(tmp_path.glob("wanbox-serve-real-*"))  # the root (and its checkpoint) was removed
