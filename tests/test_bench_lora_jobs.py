"""bench/bench_lora_jobs.py's own logic on the CPU (tiny config): it runs end to end and its checks hold."""

from __future__ import annotations

import json

import pytest

from bench.bench_lora_jobs import main


@pytest.mark.usefixtures("one_cpu_thread")
def test_tiny_run_reports_switching_and_bitwise_plain_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    kept = {}
    for method in ("merged", "unmerged"):
        assert main(["--tiny", "--rank", "4", "--method", method]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["bitwise_after_lora_jobs"] and result["bitwise_weights_at_end"] and result["lora_changes_latent"]
        assert result["same_lora_same_latent"]
        for job in ("job_a", "job_b"):
            assert set(result[job]["methods"].values()) == {method}
            assert result[job]["forwards"] == {"high_noise": 2, "low_noise": 2}  # the preset: 2 + 2 steps, guide 1
            assert result[job]["ignored_keys"] == {"high_noise": 25}  # 5 blocks x (2 pairs + 1 diff)
        assert result["switch_s"] >= 0 and result["tokens"] == 36
        kept[method] = result["pristine_bytes"]
    # merged keeps a copy of every touched weight; unmerged only of what no hook reaches (diffs, fp32 islands)
    assert kept["merged"] > kept["unmerged"] > 0
