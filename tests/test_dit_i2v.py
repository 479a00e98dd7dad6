"""The I2V DiT against the reference fixtures (every case in dit_i2v/cases.json), plus its fast paths.

Does not test the loader's error handling (tests/test_weights.py does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import attention as attn_mod
from pipeline.models.dit import DiTConfig, WanDiT
from pipeline.models.rope import apply_rope, axis_dims, rope_tables
from pipeline.weights.loader import load_i2v_experts
from tests.sp_fake import run_ranks

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "wan_ref" / "dit_i2v"
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"] if FIXTURE.is_dir() else []


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def experts() -> dict[str, WanDiT]:
    high, low = load_i2v_experts(FIXTURE, torch.float32, "cpu")
    return {"high_noise_model": high, "low_noise_model": low}


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "cases.safetensors")


def _inputs(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensors[spec["key"]] for name, spec in case["inputs"].items()}


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got = got.reshape(want.shape).float()
    return ((got - want).norm() / want.norm()).item(), (got - want).abs().max().item()


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    rel, mx = _errors(got, want)
    assert rel <= tol["rel_l2"] and mx <= tol["max_abs"], f"{what}: rel-L2 {rel:.3g}, max-abs {mx:.3g} > {tol}"


def test_fixture_cases_were_found() -> None:
    assert len(CASES) >= 3, f"no dit_i2v cases under {FIXTURE}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_matches_reference(case: dict, experts: dict[str, WanDiT], tensors: dict) -> None:
    inp = _inputs(case, tensors)
    record: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = experts[case["expert"]]([inp["x"]], inp["t"], [inp["context"]], case["seq_len"], [inp["y"]], record=record)
    assert isinstance(out, list) and len(out) == 1
    _assert_close(out[0], tensors[case["expected"]["out"]["key"]], case["tolerance"], case["name"])
    for name, spec in case.get("debug", {}).items():
        _assert_close(record[name], tensors[spec["key"]], case["tolerance"], f"{case['name']} debug {name}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sequence_parallel_equals_single_process(world_size: int, experts: dict, tensors: dict) -> None:
    """Every case sharded over 2 and 3 fake ranks (3 forces extra padding rows) gives the unsharded output."""
    for case in CASES:
        model, inp = experts[case["expert"]], _inputs(case, tensors)
        args = (inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
        with torch.no_grad():
            single = model(*args)
        outs = run_ranks(world_size, lambda sp, m=model, a=args: m(*a, sp=sp))
        for rank, out in enumerate(outs):
            rel, mx = _errors(out, single)
            assert rel < 1e-6 and mx < 1e-5, f"{case['name']} rank {rank}/{world_size}: rel {rel:.3g} max {mx:.3g}"
        _assert_close(outs[0], tensors[case["expected"]["out"]["key"]], case["tolerance"], case["name"])


def test_tensor_input_gives_tensor_output(experts: dict, tensors: dict) -> None:
    case = CASES[0]
    inp = _inputs(case, tensors)
    with torch.no_grad():
        out = experts[case["expert"]](inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
    assert isinstance(out, torch.Tensor) and out.shape == inp["x"].shape and out.dtype == torch.float32


def test_uniform_per_token_t_equals_scalar_t(experts: dict, tensors: dict) -> None:
    """[1, seq_len] holding one value takes the broadcast path and equals t of shape [1]."""
    case = CASES[0]
    inp = _inputs(case, tensors)
    model = experts[case["expert"]]
    t_tokens = inp["t"].reshape(1, 1).expand(1, case["seq_len"])
    with torch.no_grad():
        a = model(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
        b = model(inp["x"], t_tokens, inp["context"], case["seq_len"], inp["y"])
    assert torch.equal(a, b)


def test_bf16_weights_run_without_autocast(tensors: dict) -> None:
    """bf16 weights: matmuls in bf16, fp32 islands kept; the result stays near the fp32 reference."""
    high, _ = load_i2v_experts(FIXTURE, torch.bfloat16, "cpu")
    assert high.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    case = next(c for c in CASES if c["expert"] == "high_noise_model")
    inp = _inputs(case, tensors)
    with torch.no_grad():
        out = high(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
    rel, _ = _errors(out, tensors[case["expected"]["out"]["key"]])
    assert out.dtype == torch.float32 and 1e-4 < rel < 5e-2


def test_bad_inputs_name_the_problem(experts: dict, tensors: dict) -> None:
    case = CASES[0]
    inp = _inputs(case, tensors)
    model = experts[case["expert"]]
    tokens = math.prod(case["grid_tokens"])
    with pytest.raises(ValueError, match="seq_len 1 is smaller"):
        model(inp["x"], inp["t"], inp["context"], 1, inp["y"])
    with pytest.raises(ValueError, match="context has shape"):
        model(inp["x"], inp["t"], inp["context"][:, :7], tokens, inp["y"])
    with pytest.raises(ValueError, match="channels"):
        model(inp["x"], inp["t"], inp["context"], tokens, inp["y"][:4])
    with pytest.raises(ValueError, match="per-token t"):
        model(inp["x"], torch.zeros(1, tokens + 1, dtype=torch.long), inp["context"], tokens, inp["y"])
    with pytest.raises(ValueError, match="batch of 2"):
        model([inp["x"], inp["x"]], inp["t"], inp["context"], tokens, inp["y"])


def test_config_reads_checkpoint_json_and_checks_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = DiTConfig.from_json(FIXTURE / "high_noise_model" / "config.json")
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.text_dim, cfg.patch_size) == (64, 2, 2, 4096, (1, 2, 2))
    assert DiTConfig.real_14b().dim == 5120 and DiTConfig.real_14b().head_dim == 128
    extra = tmp_path / "config.json"
    extra.write_text(json.dumps({"dim": 64, "num_heads": 2, "flux_capacitor": 1, "patch_size": [1, 4, 4]}))
    cfg = DiTConfig.from_json(extra)
    assert cfg.patch_size == (1, 4, 4) and "ignoring unknown field 'flux_capacitor'" in caplog.text
    for field, value, expected in (("dim", "64", "int"), ("qk_norm", 1, "bool"), ("patch_size", [1, 2], "tuple")):
        extra.write_text(json.dumps({field: value}))
        with pytest.raises(ValueError, match=f"field '{field}' = .*expected a {expected}"):
            DiTConfig.from_json(extra)
    extra.write_text(json.dumps({"dim": 64, "num_heads": 3}))
    with pytest.raises(ValueError, match="dim 64 must split into 3 heads"):
        DiTConfig.from_json(extra)


@pytest.mark.parametrize("grid", [(3, 3, 4), (2, 5, 7), (40, 1, 1)])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_rope_tables_match_complex_float64(grid: tuple[int, int, int], head_dim: int) -> None:
    """fp32 cos/sin tables reproduce the reference's float64 complex rotation, padding rows untouched."""
    tokens, pad = math.prod(grid), 3
    x = torch.randn(1, tokens + pad, 2, head_dim)
    cos, sin = rope_tables(grid, head_dim, tokens + pad)
    got = apply_rope(x, cos, sin)
    freqs = [
        torch.polar(torch.ones(n, d // 2, dtype=torch.float64),
                    torch.outer(torch.arange(n, dtype=torch.float64),
                                1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)))
        for n, d in zip(grid, axis_dims(head_dim), strict=True)
    ]
    f, h, w = grid
    mult = torch.cat([freqs[0].view(f, 1, 1, -1).expand(f, h, w, -1), freqs[1].view(1, h, 1, -1).expand(f, h, w, -1),
                      freqs[2].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(tokens, 1, -1)
    xc = torch.view_as_complex(x[0, :tokens].double().reshape(tokens, 2, -1, 2))
    want = torch.view_as_real(xc * mult).flatten(2).float()
    assert (got[0, :tokens] - want).abs().max() < 2e-6
    assert torch.equal(got[0, tokens:], x[0, tokens:])


def test_attention_cuts_keys_and_matches_math_path() -> None:
    q, k, v = torch.randn(1, 9, 2, 16), torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16)
    got = attn_mod.attention(q, k, v, k_len=7)
    assert torch.allclose(got, attn_mod.attention_math(q, k, v, 7), atol=1e-6)
    assert not torch.allclose(got, attn_mod.attention(q, k, v), atol=1e-3)
    with pytest.raises(ValueError, match="not one of"):
        attn_mod.set_backend("turbo")


@pytest.mark.gpu
def test_gpu_bf16_autocast_close_to_reference(tensors: dict) -> None:
    high, low = load_i2v_experts(FIXTURE, torch.float32, "cuda")
    for case in CASES:
        inp = {k: v.cuda() for k, v in _inputs(case, tensors).items()}
        model = high if case["expert"] == "high_noise_model" else low
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"])
        rel, _ = _errors(out.cpu(), tensors[case["expected"]["out"]["key"]])
        assert rel < 5e-2, f"{case['name']}: bf16 rel-L2 {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash", "fa3", "math"])
def test_gpu_attention_backends_agree_with_math(backend: str) -> None:
    attn_mod.set_backend(backend)
    try:
        q, k, v = (torch.randn(1, 300, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        got = attn_mod.attention(q, k, v, k_len=250).float()
        want = attn_mod.attention_math(q, k, v, 250).float()
        assert ((got - want).norm() / want.norm()) < 2e-2, attn_mod.active_backend()
    finally:
        attn_mod.set_backend("auto")


@pytest.mark.parametrize("family", ["i2v", "animate"])
def test_bench_runs_tiny_on_cpu(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.bench_dit_forward import main

    assert main(["--tiny", "--family", family, "--iters", "1", "--warmup", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["bench"] == "dit_build" and lines[1]["finite"] and lines[1]["tokens"] == 36
