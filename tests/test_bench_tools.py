"""The benchmark helpers' own logic, on the CPU: the profiler's kernel sorting and the reference's FA3 call.

The FlashAttention-3 kernel itself runs only on Hopper GPUs; here a stand-in module with its varlen contract
(packed sequences, cumulative lengths) computes per-sequence SDPA, so what is tested is the packing and
unpacking around the call, which is the code that runs unchanged on the GPU.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bench import reference
from bench.bench_profile import kind_of
from bench.bench_profile import main as profile_main


def test_kernels_are_sorted_into_kinds() -> None:
    assert kind_of("void cutlass::device_kernel<flash::enable_sm90<flash::FlashAttnFwdSm90<2>>>") == "attention"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kind_of("nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_bias_TNT") == "gemm"
    assert kind_of("triton_poi_fused_gelu_view_7") == "compiled elementwise (triton)"
    assert kind_of("Memcpy DtoD (Device -> Device)") == "copy / layout"
    assert kind_of("something_else") == "other"


def test_profile_result_accounts_for_every_kernel(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "profile.json"
    assert profile_main(["--tiny", "--top", "5", "--out", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["size"] == "tiny" and result["attention"] == "sdpa" and result["kernels_s"] > 0
    assert abs(sum(result["kinds"].values()) - result["kernels_s"]) < 1e-3
    assert result["kinds"].get("attention", 0) > 0 and len(result["top"]) == 5
    assert "kind" in capsys.readouterr().out


def _varlen_by_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                    causal=False, **_: object):  # fmt: skip
    """FA3's varlen contract on SDPA: [total, H, D] packed sequences delimited by cumulative lengths."""
    assert q.dtype in (torch.float16, torch.bfloat16) and cu_seqlens_q.dtype == torch.int32
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        sq, eq, sk, ek = cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]
        assert eq - sq <= max_seqlen_q and ek - sk <= max_seqlen_k
        o = F.scaled_dot_product_attention(q[sq:eq].transpose(0, 1)[None], k[sk:ek].transpose(0, 1)[None],
                                           v[sk:ek].transpose(0, 1)[None], is_causal=causal, scale=softmax_scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def reference_attention(kernel: str, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The reference's `flash_attention` stand-in on one kernel (the choice is restored afterwards)."""
    chosen = reference._ATTENTION["kernel"]
    reference.use_reference_attention(kernel)
    try:
        return reference.flash_attention(*args, **kwargs)
    finally:
        reference._ATTENTION["kernel"] = chosen


@pytest.mark.parametrize("returns_lse", [False, True])
def test_reference_fa3_call_packs_and_unpacks_like_the_sdpa_path(monkeypatch, returns_lse: bool) -> None:
    fake = types.ModuleType("flash_attn_interface")
    fake.flash_attn_varlen_func = (lambda *a, **k: (_varlen_by_sdpa(*a, **k), None)) if returns_lse else _varlen_by_sdpa
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 3, 16, generator=gen) for _ in range(3))
    k_lens = torch.tensor([12, 7], dtype=torch.int32)
    want = reference_attention("cudnn", q, k, v, k_lens=k_lens, dtype=torch.bfloat16)
    got = reference_attention("fa3", q, k, v, k_lens=k_lens, dtype=torch.bfloat16)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.allclose(got, want, atol=1e-2)
    assert not torch.allclose(got[1], reference_attention("cudnn", q, k, v)[1], atol=1e-2)  # lengths used


def test_reference_attention_switch(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(reference._ATTENTION, "kernel", reference._ATTENTION["kernel"])  # restored afterwards
    for name in ("fa3", "sdpa"):
        monkeypatch.setattr(reference, f"{name}_attention", lambda q, *a, n=name, **k: calls.append(n) or q)
    q = torch.ones(1, 2, 1, 4)
    for name in ("fa3", "cudnn", "default"):
        reference.use_reference_attention(name)
        assert torch.equal(reference.flash_attention(q, q, q, q_scale=2.0), 2 * q)  # the contract's q scaling
    assert calls == ["fa3", "sdpa", "sdpa"]


def test_reference_bench_states_the_speed_up_per_size() -> None:
    from bench.bench_vs_reference import speedups

    rows = [{"variant": "ours+compile", "size": "720p", "seconds_best": 10.0},
            {"variant": "reference[fa3]", "size": "720p", "seconds_best": 12.5},
            {"variant": "reference[cudnn]", "size": "720p", "seconds_best": 13.7},
            {"variant": "reference[cudnn]", "size": "480p", "seconds_best": 3.9}]  # fmt: skip
    assert speedups(rows) == ["720p ours+compile 10.0 s: 1.25x reference[fa3], 1.37x reference[cudnn]"]


def test_the_whole_job_bench_runs_every_phase_for_both_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bench.bench_job import main as job_main

    assert job_main(["--tiny"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for precision in ("bf16", "fp8"):
        warm = result[precision]["warm_job"]
        assert set(warm["phases"]) == {"t5", "vae_encode", "sampling", "vae_decode", "write"}
        assert warm["steps"] == 4 and warm["finite"] and warm["frames"] == 5
        assert warm["total_s"] == pytest.approx(sum(warm["phases"].values()), abs=0.01)
        ways = result[precision]["decode_and_write"]
        assert set(ways) == {"whole_then_write", "streamed"}
        assert all(way["total"] == pytest.approx(way["decode"] + way["write"], abs=0.01) for way in ways.values())
    assert result["bf16"]["job_40_steps_estimate_s"] > 0
