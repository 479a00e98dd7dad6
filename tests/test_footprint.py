"""Resident bytes of the real-size pools (pipeline.models.footprint), counted from meta-device modules, against
sizes computed here by hand from the 14B config and the spec; and the bench's CPU smoke run."""

from __future__ import annotations

import json

import pytest

from pipeline.models.footprint import CARDS, GIB, Footprint, memory_report, pool_footprint, smallest_card

D, F, LAYERS = 5120, 13824, 40  # the I2V expert: dim, ffn_dim, blocks
VAE_PARAMS = 126_892_531  # WAN_SPEC 1.1: Wan2.1_VAE.pth


def test_expert_bytes_follow_the_config_by_hand() -> None:
    bf16, fp8 = pool_footprint("i2v", "bf16"), pool_footprint("i2v", "fp8")
    expert = bf16.parts["high_noise"]
    assert expert == bf16.parts["low_noise"] and 14.2e9 < expert / 2 < 14.4e9  # 14.29 G parameters
    # per block, FP8: q/k/v/o of self- and cross-attention (8 d x d) and the FFN (2 d x f), one byte each,
    # plus a float32 scale per output row; everything else (biases, norms, embeddings, head) stays bf16
    weights = LAYERS * (8 * D * D + 2 * D * F)
    rows = LAYERS * (8 * D + F + D)
    assert fp8.parts["high_noise"] == expert - 2 * weights + weights + 4 * rows
    assert bf16.parts["vae"] == fp8.parts["vae"] == 4 * VAE_PARAMS  # float32
    assert 10.5 * GIB < bf16.parts["t5"] == fp8.parts["t5"] < 10.7 * GIB  # the 11.4 GB bf16 file
    animate = pool_footprint("animate", "fp8")
    assert set(animate.parts) == {"dit", "t5", "vae", "clip"} and "clip" not in fp8.parts  # I2V has no CLIP


def test_fp8_pool_fits_one_80gb_card_and_the_smallest_card_for_480p() -> None:
    report = memory_report()["i2v"]
    assert report["fp8"]["resident_gib"] < 0.6 * report["bf16"]["resident_gib"]
    assert report["fp8"]["fits_h100_80gb"] == {"480p": True, "720p": True}
    assert report["bf16"]["fits_h100_80gb"] == {"480p": True, "720p": False}  # why bf16 offloads on 80 GB
    assert report["fp8"]["smallest_card_480p"] == {"gib": 79.6, "card": "H100 80GB"}
    assert report["fp8_offload"]["smallest_card_480p"] == {"gib": 44.9, "card": "L40S"}
    fp = pool_footprint("i2v", "fp8", offload_experts=True)
    assert fp.resident_bytes == sum(fp.parts.values()) - fp.parts["low_noise"]
    huge = Footprint("i2v", "bf16", {"dit": 200 * GIB})
    assert smallest_card(huge, "480p") is None and [g for g, _ in CARDS] == sorted(g for g, _ in CARDS)
    with pytest.raises(ValueError, match="job peak: known for i2v at 480p, 720p; got animate at '480p'"):
        pool_footprint("animate", "fp8").job_peak_bytes("480p")
    with pytest.raises(ValueError, match="footprint: got family 'i2v', precision 'fp16'"):
        pool_footprint("i2v", "fp16")


def test_fp8_bench_runs_every_step_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.bench_fp8 import main
    from pipeline.models import attention as attention_mod

    try:
        assert main(["--tiny"]) == 0
    finally:
        attention_mod.allow_fp8(False)  # the bench leaves the 8-bit kernels allowed, as a fp8 pool does
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "fp8" and result["describe"]["precision"] == "fp8" and result["fp8_layers"] == 50
    assert 5e-3 < result["fp8"]["tiny"]["rel_l2_vs_bf16"] < 5e-2 and result["fp8"]["tiny"]["finite"]
    pool = result["pool_fp8_both_experts"]["sizes"]["tiny"]
    assert pool["video"] == [3, 9, 48, 64] and pool["decode_s"] > 0
    assert result["footprint_estimate"]["i2v"]["fp8"]["resident_gib"] > 0
