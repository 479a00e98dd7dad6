"""The Animate DiT against the reference fixtures (dit_animate/cases.json), sequence parallel, LoRA merge.

Also checks that widths are read from the checkpoint; does not test the loader's error handling (tests/test_weights.py does).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.models.animate_dit import AnimateConfig, WanAnimateDiT, lora_targets, merge_lora
from pipeline.models.dit import DiTConfig, WanDiT
from pipeline.models.motion_encoder import MotionEncoderSpec
from pipeline.weights.loader import load_animate_dit, tensor_shapes
from tests.sp_fake import run_ranks

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "wan_ref" / "dit_animate"
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"] if FIXTURE.is_dir() else []


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def model() -> WanAnimateDiT:
    return load_animate_dit(FIXTURE / "model", torch.float32, "cpu")


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "cases.safetensors")


def _inputs(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    return {name: tensors[spec["key"]] for name, spec in case["inputs"].items()}


def _run(model: WanAnimateDiT, case: dict, inp: dict, **kw):  # noqa: ANN202
    return model(
        inp["x"], inp["t"], inp["context"], case["seq_len"], inp["y"], clip_fea=inp["clip_fea"],
        pose_latents=inp["pose_latents"], face_pixel_values=inp["face_pixel_values"], **kw,
    )  # fmt: skip


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    if got.numel() != want.numel():  # per-sample time embeddings are recorded broadcast over tokens
        got = got[:, 0]
    got = got.reshape(want.shape).float()
    return ((got - want).norm() / want.norm()).item(), (got - want).abs().max().item()


def test_fixture_cases_were_found() -> None:
    assert len(CASES) >= 3, f"no dit_animate cases under {FIXTURE}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_matches_reference(case: dict, model: WanAnimateDiT, tensors: dict) -> None:
    record: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = _run(model, case, _inputs(case, tensors), record=record)
    tol = case["tolerance"]
    checks = {"out": (out, tensors[case["expected"]["out"]["key"]])}
    checks |= {f"debug {k}": (record[k], tensors[s["key"]]) for k, s in case.get("debug", {}).items()}
    for what, (got, want) in checks.items():
        rel, mx = _errors(got, want)
        assert rel <= tol["rel_l2"] and mx <= tol["max_abs"], f"{case['name']} {what}: rel {rel:.3g} max {mx:.3g}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_sequence_parallel_equals_single_process(world_size: int, model: WanAnimateDiT, tensors: dict) -> None:
    case = CASES[0]
    inp = _inputs(case, tensors)
    with torch.no_grad():
        single = _run(model, case, inp)
    outs = run_ranks(world_size, lambda sp: _run(model, case, inp, sp=sp))
    for rank, out in enumerate(outs):
        rel, mx = _errors(out, single)
        assert rel < 1e-6 and mx < 1e-5, f"rank {rank}/{world_size}: rel {rel:.3g} max {mx:.3g}"


def test_sequence_parallel_rejects_indivisible_token_count(model: WanAnimateDiT, tensors: dict) -> None:
    case = CASES[0]
    tokens = case["seq_len"]
    world = next(n for n in range(2, tokens) if tokens % n)
    with pytest.raises(ValueError, match=f"{tokens} tokens .* over {world} ranks"):
        run_ranks(world, lambda sp: _run(model, case, _inputs(case, tensors), sp=sp))


def test_widths_are_read_from_the_checkpoint() -> None:
    meta = json.loads((FIXTURE / "fixture_meta.json").read_text())
    config = AnimateConfig.from_checkpoint(FIXTURE / "model" / "config.json", tensor_shapes(FIXTURE / "model"))
    me = meta["motion_encoder"]
    table = {int(k): v for k, v in me["encoder_app_channels"].items()}
    size = me["generator_args"]["size"]
    assert config.motion.input_size == size == me["face_input_size"][0]
    assert config.motion.stem == table[size]
    assert config.motion.res_out == tuple(table[size // 2**i] for i in range(1, len(config.motion.res_out) + 1))
    assert config.motion.style_dim == me["generator_args"]["style_dim"]
    assert config.face_inner_dim == meta["face_encoder"]["inner_width"]
    assert config.face_heads == meta["face_encoder"]["num_heads"]
    assert config.num_face_blocks == len(range(0, config.num_layers, 5))


def test_real_14b_structures_match_the_release_counts() -> None:
    """Tensor and parameter counts of the released checkpoints (WAN_SPEC §0), built on the meta device."""
    assert MotionEncoderSpec.real().input_size == 512
    with torch.device("meta"):
        i2v, animate = WanDiT(DiTConfig.real_14b()), WanAnimateDiT(AnimateConfig.real_14b())
    for net, tensors_, params in ((i2v, 1095, 14_288_901_184), (animate, 1441, 17_274_817_108)):
        state = net.state_dict()
        assert (len(state), sum(v.numel() for v in state.values())) == (tensors_, params)


def test_face_frame_mismatch_is_explained(model: WanAnimateDiT, tensors: dict) -> None:
    case = CASES[0]
    inp = _inputs(case, tensors)
    inp["face_pixel_values"] = inp["face_pixel_values"][:, :, :1]
    with pytest.raises(ValueError, match="face frames give"):
        _run(model, case, inp)
    inp = _inputs(case, tensors)
    inp["pose_latents"] = inp["pose_latents"][:, :, :1]
    with pytest.raises(ValueError, match="pose_latents has shape"):
        _run(model, case, inp)


def _random_lora(model: nn.Module, rank: int, peft_layout: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    state = {}
    for path in list(lora_targets(model))[::7]:
        layer = model.get_submodule(path)
        a = torch.randn(rank, layer.in_features, generator=gen) * 0.05
        b = torch.randn(layer.out_features, rank, generator=gen) * 0.05
        if peft_layout:
            state[f"base_model.model.{path}.lora_A.weight"], state[f"base_model.model.{path}.lora_B.weight"] = a, b
        else:
            state[f"{path}.lora_A.default.weight"], state[f"{path}.lora_B.default.weight"] = a, b
    return state


@pytest.mark.parametrize("peft_layout", [False, True])
def test_lora_merge_equals_unmerged_adapter(peft_layout: bool, model: WanAnimateDiT, tensors: dict) -> None:
    targets = list(lora_targets(model))
    assert len(targets) == 12 * model.config.num_layers  # q,k,v,o, 6 cross (with img), ffn.0, ffn.2
    assert not any("face" in t for t in targets)
    lora = _random_lora(model, rank=4, peft_layout=peft_layout)
    merged = copy.deepcopy(model)
    paths = merge_lora(merged, lora)
    assert len(paths) == len(lora) // 2 > 5

    # The unmerged computation: y = W x + b + B (A x), added by forward hooks on the untouched copy.
    unmerged = copy.deepcopy(model)
    for path in paths:
        prefix = f"base_model.model.{path}.lora_" if peft_layout else f"{path}.lora_"
        suffix = ".weight" if peft_layout else ".default.weight"
        a, b = lora[prefix + "A" + suffix], lora[prefix + "B" + suffix]
        unmerged.get_submodule(path).register_forward_hook(
            lambda _m, inputs, out, a=a, b=b: out + (inputs[0] @ a.T) @ b.T
        )
    case = CASES[0]
    inp = _inputs(case, tensors)
    with torch.no_grad():
        got, want, base = _run(merged, case, inp), _run(unmerged, case, inp), _run(model, case, inp)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (base - want).abs().max() > 1e-2  # the LoRA really changes the output


def test_lora_errors_name_the_key(model: WanAnimateDiT) -> None:
    with pytest.raises(ValueError, match="no Linear layer 'blocks.0.nope'"):
        merge_lora(copy.deepcopy(model), {"blocks.0.nope.lora_A.default.weight": torch.zeros(2, 4),
                                          "blocks.0.nope.lora_B.default.weight": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="lacks its lora_A or lora_B"):
        merge_lora(copy.deepcopy(model), {"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(2, 64)})
    with pytest.raises(ValueError, match="do not fit Linear"):
        merge_lora(copy.deepcopy(model), {"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(2, 5),
                                          "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(64, 2)})


def test_loader_merges_a_lora_checkpoint(tmp_path: Path, model: WanAnimateDiT) -> None:
    """relighting_lora.ckpt layout ({'state_dict': ...}) merged at load: W' = W + B @ A."""
    lora = _random_lora(model, rank=3, peft_layout=False)
    path = tmp_path / "relighting_lora.ckpt"
    torch.save({"state_dict": lora}, path)
    merged = load_animate_dit(FIXTURE / "model", torch.float32, "cpu", lora_path=path)
    key = next(iter(lora)).removesuffix(".lora_A.default.weight")
    a, b = lora[f"{key}.lora_A.default.weight"], lora[f"{key}.lora_B.default.weight"]
    want = model.get_submodule(key).weight + b @ a
    assert torch.allclose(merged.get_submodule(key).weight, want, atol=1e-6)
    torch.save({"state_dict": {"blocks.0.nope.lora_A.default.weight": a}}, path)
    with pytest.raises(ValueError, match="relighting_lora.ckpt: LoRA module 'blocks.0.nope' lacks"):
        load_animate_dit(FIXTURE / "model", torch.float32, "cpu", lora_path=path)


@pytest.mark.gpu
def test_gpu_bf16_autocast_close_to_reference(tensors: dict) -> None:
    gpu_model = load_animate_dit(FIXTURE / "model", torch.bfloat16, "cuda")
    for case in CASES:
        inp = {k: v.cuda() for k, v in _inputs(case, tensors).items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = _run(gpu_model, case, inp)
        rel, _ = _errors(out.cpu(), tensors[case["expected"]["out"]["key"]])
        assert rel < 5e-2, f"{case['name']}: bf16 rel-L2 {rel:.3g}"
