"""Wan2.1 VAE against the reference fixtures (every case in vae/cases.json), plus causality, split decodes
and checkpoint errors. Must not hard-code the case list: it is read from cases.json.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.t5 import CheckpointError
from pipeline.models.vae import FeatureCache, VaeConfig, VideoVAE, WanVAE

VAE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "wan_ref" / "vae"
CKPT = "Wan2.1_VAE.pth"


def _case_names() -> list[str]:
    path = VAE_DIR / "cases.json"
    if not path.is_file():
        return ["<vae/cases.json missing>"]
    return [case["name"] for case in json.loads(path.read_text())["cases"]]


@pytest.fixture(scope="module")
def cases(wan_ref: Path) -> dict:
    return {c["name"]: c for c in json.loads((wan_ref / "vae" / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def tensors(wan_ref: Path) -> dict[str, torch.Tensor]:
    return load_file(wan_ref / "vae" / "cases.safetensors")


@pytest.fixture(scope="module")
def vae(wan_ref: Path) -> WanVAE:
    return WanVAE.from_checkpoint(wan_ref / "vae" / CKPT)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    rel = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    worst = (actual - expected).abs().max().item()
    assert rel <= tol["rel_l2"] and worst <= tol["max_abs"], f"{what}: rel_l2 {rel:.2e}, max_abs {worst:.2e}"


@pytest.mark.parametrize("name", _case_names())
def test_matches_reference_case(name: str, cases: dict, tensors: dict, vae: WanVAE) -> None:
    case = cases[name]
    ((_, given),) = case["inputs"].items()
    ((_, wanted),) = case["expected"].items()
    x, expected = tensors[given["key"]], tensors[wanted["key"]]
    assert case["kind"] in ("encode", "decode"), f"unknown case kind {case['kind']!r}"
    actual = vae.encode(x) if case["kind"] == "encode" else vae.decode(x)
    assert actual.dtype == torch.float32
    _assert_close(actual, expected, case["tolerance"], name)
    if case["kind"] == "decode":
        assert actual.abs().max() <= 1.0  # clamped like the reference wrapper


def test_encoder_is_causal(vae: WanVAE) -> None:
    """Latent frames depend only on earlier pixel frames: a shorter clip gives the same leading latents."""
    video = torch.rand(3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full, head = vae.encode(video), vae.encode(video[:, :5])
    assert full.shape == (16, 3, 2, 3) and head.shape == (16, 2, 2, 3)
    torch.testing.assert_close(head, full[:, :2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:, 2], torch.zeros_like(full[:, 2]))


def test_decode_in_time_slices_equals_whole(vae: WanVAE) -> None:
    latent = torch.randn(16, 4, 2, 3, generator=torch.Generator().manual_seed(2))
    whole = vae.decode(latent)
    assert whole.shape == (3, 13, 16, 24)
    cache = FeatureCache()
    parts = [vae.decode_frames(latent, cache, a, b) for a, b in ((0, 1), (1, 3), (3, 4))]
    assert [p.shape[1] for p in parts] == [1, 8, 4]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    # A prefix decodes to the same leading frames (causal decoder).
    torch.testing.assert_close(vae.decode(latent[:, :2]), whole[:, :5], rtol=1e-5, atol=1e-5)


def test_decode_as_layer_pipeline_equals_whole(vae: WanVAE) -> None:
    """Two 'ranks', each with its own cache, each running half of the decoder layers frame by frame."""
    latent = torch.randn(16, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    cut = vae.decoder_layer_count() // 2
    first, second = FeatureCache(), FeatureCache()
    frames = []
    for t in range(latent.shape[1]):
        hidden = vae.run_decoder_layers(vae.decoder_input(latent[:, t : t + 1]), first, 0, cut)
        out = vae.run_decoder_layers(hidden, second, cut, vae.decoder_layer_count())
        frames.append(vae.decoder_output(out))
    assert not set(first.frames) & set(second.frames)
    assert torch.equal(torch.cat(frames, dim=1), vae.decode(latent))


def test_decode_stream_yields_one_then_four_frames(vae: WanVAE) -> None:
    latent = torch.randn(16, 3, 2, 3, generator=torch.Generator().manual_seed(4))
    pieces = []
    for frames in vae.decode_stream(latent):
        assert torch.is_grad_enabled()  # the stream must not leak no_grad into the caller
        pieces.append(frames)
    assert [p.shape[1] for p in pieces] == [1, 4, 4]
    assert torch.equal(torch.cat(pieces, dim=1), vae.decode(latent))


def test_frames_not_4n_plus_1_warn_and_follow_reference(vae: WanVAE) -> None:
    video = torch.rand(3, 7, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with pytest.warns(UserWarning, match="7 frames is not 4n\\+1"):
        latent = vae.encode(video)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(latent, vae.encode(video[:, :5]))


def test_bad_shapes_are_named(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"video: shape \[9, 32, 48\]"):
        vae.encode(torch.zeros(9, 32, 48))
    with pytest.raises(ValueError, match=r"latent: shape \[8, 1, 4, 6\], expected \[16"):
        vae.decode(torch.zeros(8, 1, 4, 6))
    with pytest.raises(ValueError, match="cache"):
        vae.decode_frames(torch.zeros(16, 2, 4, 6), FeatureCache(), 1, 2)


def test_bf16_option_is_close_to_float32(wan_ref: Path, vae: WanVAE) -> None:
    bf16 = WanVAE.from_checkpoint(wan_ref / "vae" / CKPT, dtype=torch.bfloat16)
    video = torch.rand(3, 5, 16, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ref, low = vae.encode(video), bf16.encode(video)
    assert low.dtype == torch.float32
    rel = ((low - ref).norm() / ref.norm()).item()
    assert 0 < rel < 3e-2, rel


def test_checkpoint_errors_name_file_and_key(wan_ref: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing.pth"
    with pytest.raises(CheckpointError, match="nothing.pth: checkpoint file not found"):
        WanVAE.from_checkpoint(missing)
    state = torch.load(wan_ref / "vae" / CKPT, weights_only=True)
    broken = dict(state)
    del broken["decoder.upsamples.3.time_conv.weight"]
    path = tmp_path / "no_key.pth"
    torch.save(broken, path)
    with pytest.raises(
        CheckpointError, match=r"no_key.pth: missing key 'decoder.upsamples.3.time_conv.weight'"
    ):
        WanVAE.from_checkpoint(path)
    reshaped = dict(state)
    reshaped["decoder.head.2.bias"] = torch.zeros(4)
    path = tmp_path / "bad_shape.pth"
    torch.save(reshaped, path)
    with pytest.raises(CheckpointError, match=r"bad_shape.pth: key 'decoder.head.2.bias' has shape \[4\]"):
        WanVAE.from_checkpoint(path)
    extra = dict(state, **{"encoder.extra.weight": torch.zeros(1)})
    path = tmp_path / "extra.pth"
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match="unexpected key 'encoder.extra.weight'"):
        WanVAE.from_checkpoint(path)


def test_real_size_architecture_matches_the_release() -> None:
    """At dim 96 the network has the released file's 194 tensors and 126,892,531 parameters."""
    with torch.device("meta"):
        model = VideoVAE(VaeConfig())
    state = model.state_dict()
    assert len(state) == 194
    assert sum(t.numel() for t in state.values()) == 126_892_531
    shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


@pytest.mark.gpu
def test_cuda_matches_reference_cases(wan_ref: Path, cases: dict, tensors: dict) -> None:
    """float32 on CUDA (TF32 off) meets the fixture tolerances; bf16 stays close."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = WanVAE.from_checkpoint(wan_ref / "vae" / CKPT, device="cuda")
        bf16 = WanVAE.from_checkpoint(wan_ref / "vae" / CKPT, dtype=torch.bfloat16)
        assert bf16.to("cuda") is bf16  # loaded on the CPU, moved like the warm pool moves it
        for name, case in cases.items():
            ((_, given),) = case["inputs"].items()
            ((_, wanted),) = case["expected"].items()
            x, expected = tensors[given["key"]].cuda(), tensors[wanted["key"]]
            run = (lambda v, x=x: v.encode(x)) if case["kind"] == "encode" else (lambda v, x=x: v.decode(x))
            _assert_close(run(fp32).cpu(), expected, case["tolerance"], name)
            low = run(bf16).cpu()
            assert ((low - expected).norm() / expected.norm()).item() < 5e-2, name
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_other_architectures_are_read_from_the_file(tmp_path: Path) -> None:
    """Width, stages, blocks, attention and temporal flags all come from the checkpoint's keys."""
    cfg = VaeConfig(
        dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(0.5,), temporal_downsample=(True, False)
    )
    torch.manual_seed(7)
    torch.save(VideoVAE(cfg).state_dict(), tmp_path / CKPT)
    vae = WanVAE.from_checkpoint(tmp_path / CKPT)
    assert vae.model.config == cfg
    latent = vae.encode(torch.rand(3, 5, 16, 16) * 2 - 1)
    assert latent.shape == (16, 3, 4, 4)  # one temporal halving: chunks [1], [4] -> 1 + 2 latent frames
    assert vae.decode(latent).shape == (3, 5, 16, 16)
