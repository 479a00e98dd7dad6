"""optimize(): fused q/k/v and regional compile compute the plain DiTs' function on the reference fixtures.

Runs on the CPU in float32 (tiny fixture checkpoints); does not measure speed (bench/bench_fast.py does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.dit import DiTConfig, WanDiT
from pipeline.models.fast import FastSelfAttention, fused_blocks, optimize
from pipeline.models.rope import rope_tables
from pipeline.weights.loader import load_animate_dit, load_i2v_experts
from tests.sp_fake import run_ranks

WAN_REF = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "wan_ref"
I2V, ANIMATE = WAN_REF / "dit_i2v", WAN_REF / "dit_animate"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread


def _cases(folder: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    return json.loads((folder / "cases.json").read_text())["cases"], load_file(folder / "cases.safetensors")


def _inputs(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    return {name: tensors[spec["key"]] for name, spec in case["inputs"].items()}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _run_i2v(model: WanDiT, case: dict, inp: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"], **kw)


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct storages behind parameters and buffers (views of one storage count once)."""
    seen = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    return sum(seen.values())


def test_fused_i2v_equals_plain_and_the_reference() -> None:
    cases, tensors = _cases(I2V)
    plain = dict(
        zip(("high_noise_model", "low_noise_model"), load_i2v_experts(I2V, torch.float32, "cpu"), strict=True)
    )
    fast = dict(
        zip(("high_noise_model", "low_noise_model"), load_i2v_experts(I2V, torch.float32, "cpu"), strict=True)
    )
    keys, memory = list(plain["high_noise_model"].state_dict()), _storage_bytes(plain["high_noise_model"])
    for model in fast.values():
        assert optimize(model, compile=False, fuse_qkv=True) is model
        assert fused_blocks(model) == len(model.blocks) == model.config.num_layers
    high = fast["high_noise_model"]
    assert list(high.state_dict()) == keys and _storage_bytes(high) == memory  # same keys, no second copy
    attn = high.blocks[0].self_attn
    assert isinstance(attn, FastSelfAttention) and attn.qkv_weight is not None
    assert attn.k.weight.data_ptr() == attn.qkv_weight[attn.k.weight.shape[0]].data_ptr()
    for case in cases:
        inp = _inputs(case, tensors)
        want = _run_i2v(plain[case["expert"]], case, inp)
        got = _run_i2v(fast[case["expert"]], case, inp)
        assert _rel(got, want) <= 1e-6, case["name"]
        reference = tensors[case["expected"]["out"]["key"]]
        assert _rel(got, reference) <= case["tolerance"]["rel_l2"], case["name"]


def test_fused_animate_equals_plain() -> None:
    cases, tensors = _cases(ANIMATE)
    plain = load_animate_dit(ANIMATE / "model", torch.float32, "cpu")
    fast = optimize(load_animate_dit(ANIMATE / "model", torch.float32, "cpu"), compile=False)
    assert fused_blocks(fast) == len(fast.blocks)
    for case in cases[:2]:
        inp = _inputs(case, tensors)
        kw = {k: inp[k] for k in ("clip_fea", "pose_latents", "face_pixel_values")}
        with torch.no_grad():
            want = plain(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"], **kw)
            got = fast(inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"], **kw)
        assert _rel(got, want) <= 1e-6, case["name"]
        assert _rel(got, tensors[case["expected"]["out"]["key"]]) <= case["tolerance"]["rel_l2"], case["name"]


def test_moving_keeps_qkv_fused_and_replacing_weights_is_noticed() -> None:
    cases, tensors = _cases(I2V)
    case = next(c for c in cases if c["expert"] == "high_noise_model")
    inp = _inputs(case, tensors)
    high, _ = load_i2v_experts(I2V, torch.float32, "cpu")
    want = _run_i2v(high, case, inp)
    optimize(high, compile=False)
    high.to(torch.float64).to(torch.float32)  # what an offload round trip does to every tensor
    assert fused_blocks(high) == len(high.blocks)
    assert high.blocks[1].self_attn.qkv_weight.dtype == torch.float32
    assert _rel(_run_i2v(high, case, inp), want) <= 1e-6
    # in-place load (copy into the views) updates the fused weights too
    state = {k: v.clone() for k, v in high.state_dict().items()}
    state["blocks.0.self_attn.v.weight"].mul_(-1)
    high.load_state_dict(state)
    changed = _run_i2v(high, case, inp)
    assert fused_blocks(high) == len(high.blocks) and _rel(changed, want) > 1e-3
    # assign=True puts new tensors in place of the views: the stale fused copy must not be used
    state["blocks.0.self_attn.v.weight"].mul_(-1)
    high.load_state_dict(state, assign=True)
    assert _rel(_run_i2v(high, case, inp), want) <= 1e-6
    assert fused_blocks(high) == 0  # every q/k/v was replaced


def test_sequence_parallel_through_the_fast_path() -> None:
    cases, tensors = _cases(I2V)
    high, low = (optimize(m, compile=False) for m in load_i2v_experts(I2V, torch.float32, "cpu"))
    for case in cases[:2]:
        model = high if case["expert"] == "high_noise_model" else low
        inp = _inputs(case, tensors)
        single = _run_i2v(model, case, inp)
        outs = run_ranks(3, lambda sp, m=model, c=case, i=inp: _run_i2v(m, c, i, sp=sp))
        assert all(_rel(out, single) <= 1e-6 for out in outs), case["name"]


def test_head_major_layout_and_unfused_fast_path_compute_the_same() -> None:
    cases, tensors = _cases(I2V)
    case = cases[0]
    inp = _inputs(case, tensors)
    models = dict(
        zip(("high_noise_model", "low_noise_model"), load_i2v_experts(I2V, torch.float32, "cpu"), strict=True)
    )
    model = models[case["expert"]]
    want = _run_i2v(model, case, inp)
    optimize(model, compile=False, attention_layout="bhld")
    assert _rel(_run_i2v(model, case, inp), want) <= 1e-6
    optimize(model, compile=False, fuse_qkv=False)
    assert fused_blocks(model) == 0 and model.blocks[0].self_attn.qkv_weight is None
    assert _rel(_run_i2v(model, case, inp), want) <= 1e-6
    with pytest.raises(ValueError, match="attention_layout 'hbld'"):
        optimize(model, compile=False, attention_layout="hbld")
    with pytest.raises(TypeError, match="takes a WanDiT"):
        optimize(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_compiled_block_equals_eager_block() -> None:
    """CPU inductor on one block of a tiny random model (one compile, shared by blocks of the same shapes)."""
    torch.manual_seed(0)
    config = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_len=8)
    model = WanDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    optimize(model, compile=False)
    grid, rows = (2, 3, 4), 26  # 24 tokens + 2 padding rows: keys are cut at 24
    x = torch.randn(1, rows, config.dim)
    e0 = torch.randn(1, 1, 6, config.dim)
    context = torch.randn(1, config.text_len, config.dim)
    rope = rope_tables(grid, config.head_dim, rows)
    block = model.blocks[0]
    with torch.no_grad():
        want = block(x, e0, rope, 24, context, None, None)
        block.compile(dynamic=False)
        got = block(x, e0, rope, 24, context, None, None)
    assert _rel(got, want) <= 1e-5
    assert not torch.equal(got, x)


# ---------------------------------------------------------------------------------------------- staged loading


def test_staged_reader_returns_every_tensor_as_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny pieces and a short ring force tensors across many reads and buffer reuse; CPU runs the same steps."""
    from safetensors.torch import save_file

    from pipeline.weights import loader

    monkeypatch.setattr(loader, "STAGE_PIECE_BYTES", 1000)
    monkeypatch.setattr(loader, "STAGE_BUFFERS", 3)
    monkeypatch.setattr(loader, "STAGE_THREADS", 2)
    torch.manual_seed(0)
    stored = {
        "blocks.0.w": torch.randn(37, 29), "blocks.0.b": torch.randn(5), "empty": torch.zeros(0, 4),
        "half": torch.randn(300).to(torch.bfloat16), "steps": torch.arange(7, dtype=torch.int64),
        "big": torch.randn(3, 1000),
    }  # fmt: skip
    file = tmp_path / "shard.safetensors"
    save_file(stored, file)
    got = {key: t for _f, key, t in loader._StagedReader(file, None, torch.device("cpu")).tensors(torch.bfloat16)}
    assert set(got) == set(stored)
    for key, tensor in stored.items():
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    kept = {key: t for _f, key, t in loader._StagedReader(file, None, torch.device("cpu")).tensors(None)}
    assert kept["big"].dtype == torch.float32 and torch.equal(kept["big"], stored["big"])
    with pytest.raises(loader.CheckpointError, match="the index lists 'nope' here but the shard lacks it"):
        loader._StagedReader(file, [*stored, "nope"], torch.device("cpu"))


@pytest.mark.gpu
def test_staged_cuda_load_equals_cpu_load() -> None:
    cpu = load_i2v_experts(I2V, torch.bfloat16, "cpu")[0].state_dict()
    gpu = load_i2v_experts(I2V, torch.bfloat16, "cuda")[0].state_dict()
    assert all(torch.equal(gpu[k].cpu(), v) for k, v in cpu.items())


@pytest.mark.gpu
def test_gpu_optimized_bf16_close_to_plain_and_reference() -> None:
    """On CUDA: fused + compiled (Triton) bf16 forwards stay at bf16 distance from the plain model."""
    cases, tensors = _cases(I2V)
    names = ("high_noise_model", "low_noise_model")
    plain = dict(zip(names, load_i2v_experts(I2V, torch.bfloat16, "cuda"), strict=True))
    fast = {n: optimize(m) for n, m in zip(names, load_i2v_experts(I2V, torch.bfloat16, "cuda"), strict=True)}
    for case in cases:
        inp = {k: v.cuda() for k, v in _inputs(case, tensors).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = _run_i2v(plain[case["expert"]], case, inp)
            got = _run_i2v(fast[case["expert"]], case, inp)
        assert _rel(got, want) < 1e-2, case["name"]
        assert _rel(got.cpu(), tensors[case["expected"]["out"]["key"]]) < 5e-2, case["name"]


def test_attention_op_copies_views_once_a_kernel_refuses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that only takes contiguous q/k/v (as some cuDNN builds do) gets copies, and keeps getting them."""
    from pipeline.models import attention as attention_mod
    from pipeline.models import fast

    real, calls = attention_mod.attention, []

    def picky(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: int | None = None) -> torch.Tensor:
        calls.append(all(t.is_contiguous() for t in (q, k, v)))
        if not calls[-1]:
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q, k, v, k_len)

    monkeypatch.setattr(attention_mod, "attention", picky)
    monkeypatch.setattr(fast, "_strided_inputs_ok", True)
    qkv = torch.randn(1, 10, 3 * 8)
    q, k, v = (t.unflatten(2, (2, 4)) for t in qkv.chunk(3, dim=-1))  # views, as the fused projection gives
    want = attention_mod.attention_math(q, k, v, 9)
    assert torch.allclose(fast.dit_attention(q, k, v, 9), want, atol=1e-6)
    assert torch.allclose(fast.dit_attention(q, k, v, 9), want, atol=1e-6)
    assert calls == [False, True, True] and fast._strided_inputs_ok is False
