"""bench/bench_lora.py's own logic on the CPU (tiny config): it runs end to end and its checks hold."""

from __future__ import annotations

import json

import pytest

from bench.bench_lora import main


def test_tiny_run_reports_times_costs_and_bitwise_restores(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tiny", "--steps", "1", "--rank", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bitwise_weights_after_merges"] and result["bitwise_weights_at_end"]
    row = result["forward"]["tiny"]
    assert row["bitwise_output_after_restore"] and row["bitwise_output_after_hooks"] and row["tokens"] == 36
    assert result["weights_touched_per_expert"] == 5 * 27  # 10 weights + 10 biases + 7 full diffs per block
    assert set(result["costs"]) == {"merge_restore_s_per_gib", "hook_s_per_layer_ktoken"}
    assert all(result[k] >= 0 for k in ("first_merge_s", "restore_s", "switch_merge_s", "switch_restore_s"))
