"""Smoke test of bench/bench_pool.py --tiny: the same code path as on the GPUs, on the CPU with gloo.

Checks the JSON it writes (every configuration ran, the CFG-parallel latent equals the 1-rank latent).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_pool_tiny_runs_and_reports(tmp_path) -> None:
    out = tmp_path / "pool.json"
    done = subprocess.run([sys.executable, "bench/bench_pool.py", "--tiny", "--worlds", "1,2", "--modes", "cfg",
                           "--steps", "2", "--decode", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(r["world_size"], r["mode"]): r for r in report["runs"]}
    assert set(runs) == {(1, "single"), (2, "cfg")}
    cfg = runs[(2, "cfg")]
    assert (cfg["cfg"], cfg["ulysses"]) == (2, 1) and len(cfg["peak_memory"]) == 2
    assert len(cfg["step_seconds"]) == 2 and all(s > 0 for s in cfg["step_seconds"])
    assert cfg["rel_l2_vs_1"] < 1e-5, "CFG-parallel must give the 1-rank latent"
    assert runs[(1, "single")]["speedup"] == 1.0
    assert cfg["decode_seconds"] > 0 and cfg["decode_max_abs_diff_vs_1"] == 0.0, "pipelined decode is exact"
    assert "speedup" in done.stdout and "2 cfg" in done.stdout
