"""Precision fp8 (pipeline.models.fp8) on the tiny fixture DiTs: the converted model computes the float32
function within FP8 rounding, exactly the block Linears are converted, the fast path fuses and compiles it,
checkpoint state re-quantizes bitwise, and unusable devices are refused with what is needed.

The CPU runs the dequantized float32 matmul; torch's CPU `_scaled_mm` (the CUDA path's call) is checked
against it here, the CUDA kernel in the `gpu` tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import attention as attention_mod
from pipeline.models.dit import DiTConfig, WanDiT
from pipeline.models.fast import fused_blocks, optimize
from pipeline.models.fp8 import (
    FP8,
    Fp8Linear,
    Fp8Unsupported,
    apply_precision,
    check_fp8_support,
    dequantize,
    describe,
    fp8_layers,
    fp8_linear,
    fp8_unsupported_reason,
    quantize,
)
from pipeline.models.rope import rope_tables
from pipeline.weights.loader import load_animate_dit, load_i2v_experts

WAN_REF = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "wan_ref"
I2V, ANIMATE = WAN_REF / "dit_i2v", WAN_REF / "dit_animate"
EXPERTS = ("high_noise_model", "low_noise_model")
# One FP8 GEMM rounds both factors to 3 mantissa bits (each element within 2^-4 of itself): ~3% rel-L2 on
# random data. The residual stream, norms, modulation and head are not quantized, so a whole forward stays
# at that order (the fixture cases: 1.4-2.4%). Above 5% something is wrong; below 0.5% nothing was quantized.
FORWARD_REL_L2 = (5e-3, 5e-2)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread


@pytest.fixture(autouse=True)
def _fp8_attention_off() -> None:
    yield
    attention_mod.allow_fp8(False)  # apply_precision("fp8") turns the 8-bit kernels on process-wide


def _cases(folder: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    return json.loads((folder / "cases.json").read_text())["cases"], load_file(folder / "cases.safetensors")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _run(model: torch.nn.Module, case: dict, tensors: dict) -> torch.Tensor:
    inp = {name: tensors[spec["key"]] for name, spec in case["inputs"].items()}
    kw = {k: inp[k] for k in ("clip_fea", "pose_latents", "face_pixel_values") if k in inp}
    with torch.no_grad():
        return model(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"], **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _experts() -> dict[str, WanDiT]:
    return dict(zip(EXPERTS, load_i2v_experts(I2V, torch.float32, "cpu"), strict=True))


# ---------------------------------------------------------------------------------------------- quantization


def test_quantize_keeps_each_element_within_e4m3_rounding() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.tensor([1e-4, 1e-2, 1.0, 30.0, 1e3, 0.0])[:, None]
    codes, scale = quantize(x)
    assert codes.dtype == FP8 and codes.shape == x.shape and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = dequantize(codes, scale)
    assert torch.equal(back[5], torch.zeros(64))  # an all-zero row stays zero (no division by zero)
    rows = slice(0, 5)
    assert torch.allclose(back[rows].abs().amax(1), x[rows].abs().amax(1), rtol=1e-6)  # row max -> 448 exactly
    # normal e4m3 numbers: within 2^-4 relative; the tiny ones (subnormal codes) within half a code step
    bound = torch.maximum(x[rows].abs() * 2**-4, scale[rows] * 2**-10)
    assert ((back[rows] - x[rows]).abs() <= bound * (1 + 1e-6)).all()


def test_scaled_mm_call_computes_the_dequantized_product() -> None:
    """torch._scaled_mm with the CUDA path's arguments (row-wise scales, column-major codes, bias in the
    epilogue, bf16 out) on torch's CPU implementation equals the float32 path up to bf16 output rounding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 64, generator=gen)
    codes, scale = quantize(torch.randn(48, 64, generator=gen) * torch.linspace(0.1, 3, 48)[:, None])
    bias = torch.randn(48, generator=gen)
    fast = fp8_linear(x, codes, scale, bias, torch.float32, kernel="scaled_mm")
    slow = fp8_linear(x, codes, scale, bias, torch.float32, kernel="dequant")
    exact = x @ dequantize(codes, scale).t() + bias
    assert fast.shape == slow.shape == (2, 24, 48)
    assert _rel(fast, slow) < 4e-3  # bf16 output: 2^-9 relative per element
    assert 1e-3 < _rel(slow, exact) < 5e-2  # x itself was quantized per row
    with pytest.raises(ValueError, match="fp8 kernel: got 'cutlass'"):
        fp8_linear(x, codes, scale, bias, torch.float32, kernel="cutlass")


# ---------------------------------------------------------------------------------------------- the model


def test_fixture_experts_in_fp8_stay_close_to_float32() -> None:
    cases, tensors = _cases(I2V)
    plain, low_precision = _experts(), _experts()
    for model in low_precision.values():
        assert apply_precision(model, "fp8") is model
    assert describe(low_precision["high_noise_model"]) == {
        "precision": "fp8", "linear_kernel": "dequant_fp32", "attention_kernel": "sdpa", "fp8_layers": 20}
    assert describe(plain["high_noise_model"])["precision"] == "bf16"
    for case in cases:
        rel = _rel(_run(low_precision[case["expert"]], case, tensors), _run(plain[case["expert"]], case, tensors))
        assert FORWARD_REL_L2[0] < rel < FORWARD_REL_L2[1], case["name"]


def _expected_targets(model: WanDiT, image_kv: bool) -> set[str]:
    paths = [f"self_attn.{p}" for p in "qkvo"] + [f"cross_attn.{p}" for p in "qkvo"] + ["ffn.0", "ffn.2"]
    paths += ["cross_attn.k_img", "cross_attn.v_img"] if image_kv else []
    return {f"blocks.{i}.{p}" for i in range(len(model.blocks)) for p in paths}


@pytest.mark.parametrize("family", ["i2v", "animate"])
def test_exactly_the_block_linears_are_converted(family: str) -> None:
    load = (lambda: load_i2v_experts(I2V, torch.float32, "cpu")[0]) if family == "i2v" else (
        lambda: load_animate_dit(ANIMATE / "model", torch.float32, "cpu"))  # fmt: skip
    original, model = load(), apply_precision(load(), "fp8")
    converted = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert converted == _expected_targets(model, image_kv=family == "animate")
    before, after = original.state_dict(), model.state_dict()
    for key, value in before.items():
        layer = key.rsplit(".", 1)[0]
        if layer in converted and key.endswith(".weight"):
            assert after[key].dtype == FP8 and after[f"{layer}.weight_scale"].shape == (value.shape[0], 1)
            assert _rel(dequantize(after[key], after[f"{layer}.weight_scale"]), value) < 4e-2, key
        else:  # embeddings, time MLP, head, norms, modulation, biases, Animate's towers: untouched
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert set(after) == set(before) | {f"{name}.weight_scale" for name in converted}


def test_fast_path_fuses_the_fp8_qkv_either_order() -> None:
    cases, tensors = _cases(I2V)
    case = next(c for c in cases if c["expert"] == "high_noise_model")
    unfused = apply_precision(_experts()["high_noise_model"], "fp8")
    want = _run(unfused, case, tensors)
    first = optimize(apply_precision(_experts()["high_noise_model"], "fp8"), compile=False, fuse_qkv=True)
    second = apply_precision(optimize(_experts()["high_noise_model"], compile=False, fuse_qkv=True), "fp8")
    for model in (first, second):
        attn = model.blocks[0].self_attn
        assert fused_blocks(model) == len(model.blocks) and attn.qkv_weight.dtype == FP8
        assert attn.qkv_scale.shape == (3 * model.config.dim, 1)
        assert attn.k.weight.data_ptr() == attn.qkv_weight[model.config.dim].data_ptr()  # views, no copy
        assert attn.v.weight_scale.data_ptr() == attn.qkv_scale[2 * model.config.dim].data_ptr()
        assert _rel(_run(model, case, tensors), want) <= 1e-6
    # moving keeps the views; a dtype cast after conversion is refused, not computed with raw codes
    first.to("cpu")
    assert fused_blocks(first) == len(first.blocks) and _rel(_run(first, case, tensors), want) <= 1e-6
    with pytest.raises(RuntimeError, match="cast after conversion"):
        _run(first.to(torch.float64), case, tensors)


def test_compiled_fp8_block_equals_eager() -> None:
    """CPU inductor on one fused FP8 block of a tiny random model (activation quantization traced)."""
    torch.manual_seed(0)
    config = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=1, text_len=8)
    model = WanDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    optimize(apply_precision(model, "fp8"), compile=False)
    rows, block = 26, model.blocks[0]
    args = (torch.randn(1, rows, 64), torch.randn(1, 1, 6, 64), rope_tables((2, 3, 4), config.head_dim, rows), 24,
            torch.randn(1, 8, 64), None, None)  # fmt: skip
    with torch.no_grad():
        want = block(*args)
        block.compile(dynamic=False)
        got = block(*args)
    assert fused_blocks(model) == 1 and _rel(got, want) <= 1e-5 and not torch.equal(got, args[0])


def test_checkpoint_state_is_requantized_bitwise() -> None:
    """Loading the float32 checkpoint into an FP8 model gives exactly the codes and scales of converting it,
    so a pool can restore its weights (after a merged LoRA, say) from the file it loaded."""
    original = _experts()["high_noise_model"]
    state = {k: v.clone() for k, v in original.state_dict().items()}
    model = apply_precision(_experts()["high_noise_model"], "fp8")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.blocks[1].ffn[0]
    layer.set_weight(layer.dequantized_weight() + 0.1)  # e.g. W + strength * B A
    assert not torch.equal(model.state_dict()["blocks.1.ffn.0.weight_scale"], fresh["blocks.1.ffn.0.weight_scale"])
    model.load_state_dict(state)
    loaded = model.state_dict()
    assert set(loaded) == set(fresh) and all(torch.equal(_bits(loaded[k]), _bits(v)) for k, v in fresh.items())
    other = apply_precision(_experts()["low_noise_model"], "fp8")
    other.load_state_dict(fresh)  # an FP8 state dict loads as it is
    assert torch.equal(other.blocks[0].self_attn.q.weight_scale, fresh["blocks.0.self_attn.q.weight_scale"])


# ---------------------------------------------------------------------------------------------- refusals


def test_unusable_devices_and_values_are_refused_with_what_is_needed() -> None:
    reason = fp8_unsupported_reason((8, 0), "NVIDIA A100-SXM4-80GB")
    assert reason is not None and "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in reason
    assert "8.9 or newer" in reason and "H100" in reason and "use precision bf16" in reason
    assert fp8_unsupported_reason((8, 9), "NVIDIA L4") is None and fp8_unsupported_reason((9, 0), "H200") is None
    with pytest.raises(Fp8Unsupported, match="meta is not an NVIDIA GPU"):
        check_fp8_support(torch.device("meta"))
    check_fp8_support(torch.device("cpu"))  # the float32 reference path runs anywhere
    model = _experts()["high_noise_model"]
    with pytest.raises(ValueError, match="precision: got 'int8', expected one of bf16, fp8"):
        apply_precision(model, "int8")
    assert apply_precision(model, "bf16") is model and fp8_layers(model) == 0
    with pytest.raises(ValueError, match=r"Linear\(24, 48\): FP8 GEMMs need both sizes to be multiples of 16"):
        Fp8Linear.convert(torch.nn.Linear(24, 48))
    with torch.device("meta"):
        ghost = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match="meta device"):
        Fp8Linear.convert(ghost)


def test_worker_flag_reaches_the_model_load() -> None:
    from pipeline.families.base import speed_up
    from pipeline.worker import parse_args

    base = ["--model", "i2v-A14B", "--socket", "s", "--checkpoint-dir", "d"]
    assert parse_args(base).precision == "bf16" and parse_args([*base, "--precision", "fp8"]).precision == "fp8"
    with pytest.raises(SystemExit):
        parse_args([*base, "--precision", "fp4"])
    experts = list(_experts().values())
    speed_up(experts, argparse.Namespace(device="cpu", compile="auto", precision="fp8"), fuse_qkv=True)
    assert all(fp8_layers(e) == 20 and fused_blocks(e) == len(e.blocks) for e in experts)
    assert not attention_mod._fp8_allowed  # 8-bit attention is opt-in (lossy: bench/RESULTS.md)
    assert parse_args([*base, "--precision", "fp8", "--fp8-attention"]).fp8_attention
    speed_up(list(_experts().values()), argparse.Namespace(device="cpu", compile="auto", precision="fp8",
                                                           fp8_attention=True), fuse_qkv=True)
    assert attention_mod._fp8_allowed  # the 8-bit attention kernels may now be picked (after their self-test)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_fp8_forward_compiled_close_to_bf16() -> None:
    """On an sm89+ GPU: torch._scaled_mm equals the dequantized product, and the compiled fused FP8 experts
    under bf16 autocast (as the pool runs them) stay within FP8 distance of the bf16 ones."""
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(Fp8Unsupported, match="compute capability"):
            apply_precision(load_i2v_experts(I2V, torch.bfloat16, "cuda")[0], "fp8")
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    codes, scale = quantize(torch.randn(128, 256, device="cuda", generator=gen))
    bias = torch.randn(128, device="cuda", generator=gen)
    fast = fp8_linear(x, codes, scale, bias, torch.bfloat16)
    assert _rel(fast, fp8_linear(x, codes, scale, bias, torch.bfloat16, kernel="dequant")) < 1e-2
    cases, tensors = _cases(I2V)
    plain = dict(zip(EXPERTS, load_i2v_experts(I2V, torch.bfloat16, "cuda"), strict=True))
    low = {n: optimize(apply_precision(m, "fp8", fp8_attention=False))
           for n, m in zip(EXPERTS, load_i2v_experts(I2V, torch.bfloat16, "cuda"), strict=True)}  # fmt: skip
    assert describe(low["high_noise_model"])["linear_kernel"] == "scaled_mm_rowwise"
    for case in cases:
        inp = {name: tensors[spec["key"]].cuda() for name, spec in case["inputs"].items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            want = plain[case["expert"]](inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
            got = low[case["expert"]](inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
        assert FORWARD_REL_L2[0] < _rel(got, want) < FORWARD_REL_L2[1], case["name"]


def test_the_sidecar_precision_names_what_made_the_numbers() -> None:
    """bf16 on the GPU and fp32 on the CPU by default, --dtype when given, fp8 (and its 8-bit attention) over both."""
    from argparse import Namespace

    from pipeline.families.base import precision_of

    def args(**kw: object) -> Namespace:
        return Namespace(**{"dtype": None, "device": "cpu", "precision": "bf16", "fp8_attention": False, **kw})

    assert precision_of(args()) == "fp32"
    assert precision_of(args(device="cuda")) == "bf16"
    assert precision_of(args(device="cuda", dtype="fp32")) == "fp32"
    assert precision_of(args(device="cuda", precision="fp8")) == "fp8"
    assert precision_of(args(device="cuda", precision="fp8", fp8_attention=True)) == "fp8+fp8-attention"
