"""CLIP vision tower against the reference fixtures (every case in clip/cases.json), preprocessing, config
resolution and the strict `visual.*` key rules. Must not hard-code the case list.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.clip import CLIP_FILE, CONFIG_FILE, ClipVision, ClipVisionConfig, VisionTower
from pipeline.models.t5 import CheckpointError

CLIP_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "wan_ref" / "clip"


def _case_names() -> list[str]:
    path = CLIP_DIR / "cases.json"
    if not path.is_file():
        return ["<clip/cases.json missing>"]
    return [case["name"] for case in json.loads(path.read_text())["cases"]]


@pytest.fixture(scope="module")
def cases(wan_ref: Path) -> dict:
    return {c["name"]: c for c in json.loads((wan_ref / "clip" / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def tensors(wan_ref: Path) -> dict[str, torch.Tensor]:
    return load_file(wan_ref / "clip" / "cases.safetensors")


@pytest.fixture(scope="module")
def clip(wan_ref: Path) -> ClipVision:
    return ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, config=wan_ref / "clip" / "config.json")


@pytest.mark.parametrize("name", _case_names())
def test_matches_reference_case(name: str, cases: dict, tensors: dict, clip: ClipVision) -> None:
    case = cases[name]
    image = tensors[case["inputs"]["image"]["key"]]
    expected = tensors[case["expected"]["features"]["key"]]
    if "preprocessed" in case.get("debug", {}):
        torch.testing.assert_close(clip.preprocess(image), tensors[case["debug"]["preprocessed"]["key"]])
    out = clip(image)
    assert out.shape == expected.shape == (1, clip.config.tokens, clip.config.vision_dim)
    rel = ((out - expected).norm() / expected.norm()).item()
    worst = (out - expected).abs().max().item()
    tol = case["tolerance"]
    assert rel <= tol["rel_l2"] and worst <= tol["max_abs"], f"{name}: rel {rel:.2e} max {worst:.2e}"


def test_sizes_come_from_the_file_and_config(wan_ref: Path, clip: ClipVision) -> None:
    fixture = json.loads((wan_ref / "clip" / "config.json").read_text())
    cfg = clip.config
    assert (cfg.vision_dim, cfg.vision_heads, cfg.vision_layers) == (
        fixture["vision_dim"], fixture["vision_heads"], fixture["vision_layers"],
    )  # fmt: skip
    assert (cfg.image_size, cfg.patch_size, cfg.tokens) == (224, 14, 257)
    assert len(clip.tower.transformer) == cfg.vision_layers - 1  # penultimate-block features


def test_config_beside_the_file_is_used(wan_ref: Path, tmp_path: Path, clip: ClipVision) -> None:
    shutil.copy(wan_ref / "clip" / CLIP_FILE, tmp_path / CLIP_FILE)
    with pytest.raises(CheckpointError, match="vision width 64 is not a multiple of 80.*vision_heads"):
        ClipVision.from_checkpoint(tmp_path / CLIP_FILE)
    shutil.copy(wan_ref / "clip" / "config.json", tmp_path / CONFIG_FILE)
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(ClipVision.from_checkpoint(tmp_path / CLIP_FILE)(image), clip(image))


def test_config_that_disagrees_with_the_file_is_an_error(wan_ref: Path) -> None:
    config = json.loads((wan_ref / "clip" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="vision_layers = 4, but .* has 3"):
        ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, config=dict(config, vision_layers=4))


def _rewrite(wan_ref: Path, tmp_path: Path, change) -> Path:
    state = dict(torch.load(wan_ref / "clip" / CLIP_FILE, weights_only=True))
    change(state)
    path = tmp_path / CLIP_FILE
    torch.save(state, path)
    shutil.copy(wan_ref / "clip" / "config.json", tmp_path / CONFIG_FILE)
    return path


def test_visual_keys_are_strict_textual_ones_ignored(wan_ref: Path, tmp_path: Path) -> None:
    path = _rewrite(wan_ref, tmp_path, lambda s: s.pop("visual.transformer.1.mlp.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing key 'visual.transformer.1.mlp.2.bias'"):
        ClipVision.from_checkpoint(path)
    path = _rewrite(wan_ref, tmp_path, lambda s: s.update({"visual.proj_extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'visual.proj_extra'"):
        ClipVision.from_checkpoint(path)
    path = _rewrite(wan_ref, tmp_path, lambda s: s.update({"visual.pre_norm.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"key 'visual.pre_norm.bias' has shape \[3\]"):
        ClipVision.from_checkpoint(path)
    path = _rewrite(wan_ref, tmp_path, lambda s: s.update({"model.layer.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'model.layer.weight'"):
        ClipVision.from_checkpoint(path)
    # Dropping the whole text tower and log_scale changes nothing: they are not read.
    path = _rewrite(wan_ref, tmp_path, lambda s: [s.pop(k) for k in list(s) if not k.startswith("visual.")])
    assert ClipVision.from_checkpoint(path).config.vision_dim == 64


def test_bad_image_shape_is_named(clip: ClipVision) -> None:
    with pytest.raises(ValueError, match=r"image: shape \[1, 3, 32, 32\], expected \[3, height, width\]"):
        clip(torch.zeros(1, 3, 32, 32))


def test_real_size_architecture_matches_the_release() -> None:
    """ViT-H/14: 1280 wide, 16 heads of 80, 31 of 32 blocks built, released key shapes."""
    cfg = ClipVisionConfig()
    with torch.device("meta"):
        tower = VisionTower(cfg)
    state = tower.state_dict()
    assert len(tower.transformer) == 31 and tower.transformer[0].attn.heads == 16
    assert len(state) == 5 + 31 * 12
    shapes = {
        "patch_embedding.weight": (1280, 3, 14, 14),
        "cls_embedding": (1, 1, 1280),
        "pos_embedding": (1, 257, 1280),
        "transformer.30.attn.to_qkv.weight": (3840, 1280),
        "transformer.30.mlp.0.weight": (5120, 1280),
        "transformer.30.mlp.2.weight": (1280, 5120),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


@pytest.mark.gpu
def test_cuda_matches_reference_cases(wan_ref: Path, cases: dict, tensors: dict) -> None:
    """float32 on CUDA (TF32 off) meets the tolerances; float16 (the reference's GPU dtype) stays close."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        config = wan_ref / "clip" / "config.json"
        fp32 = ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, config=config, device="cuda")
        fp16 = ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, config, torch.float16).to("cuda")
        for name, case in cases.items():
            image = tensors[case["inputs"]["image"]["key"]].cuda()
            want = tensors[case["expected"]["features"]["key"]]
            got, low = fp32(image).cpu(), fp16(image).float().cpu()
            assert ((got - want).norm() / want.norm()).item() <= case["tolerance"]["rel_l2"], name
            assert ((low - want).norm() / want.norm()).item() < 2e-2, name
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bf16_option_is_close_to_float32(wan_ref: Path, clip: ClipVision) -> None:
    config = wan_ref / "clip" / "config.json"
    low = ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, config=config, dtype=torch.bfloat16)
    image = torch.rand(3, 60, 50, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ref, out = clip(image), low(image)
    assert out.dtype == torch.bfloat16
    assert 0 < ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


# The reference's constants as it writes them (wan/modules/animate/clip.py), for the hand-written steps below.
_REF_MEAN = [0.48145466, 0.4578275, 0.40821073]
_REF_STD = [0.26862954, 0.26130258, 0.27577711]


def _reference_preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIPModel.visual's steps on a [3, H, W] tensor in its own dtype: bicubic resize, mul_(0.5).add_(0.5),
    torchvision Normalize (mean and std made tensors of the input's dtype, then sub_ and div_)."""
    x = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul_(0.5).add_(0.5)
    mean = torch.as_tensor(_REF_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(_REF_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def test_bf16_preprocessing_rounds_each_step_like_the_reference(clip: ClipVision) -> None:
    """On CUDA the reference resizes and normalises Animate's bf16 pixels in bf16; the dtype switch gives the
    same numbers, bitwise, and float32 images (the CPU fixtures) keep the float32 steps."""
    image = torch.rand(3, 61, 47, generator=torch.Generator().manual_seed(3)) * 2 - 1
    low = clip.preprocess(image, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and low.shape == (1, 3, 224, 224)
    assert torch.equal(low, _reference_preprocess(image.bfloat16(), 224))
    assert torch.equal(clip.preprocess(image.bfloat16()), low)  # default: the image's own dtype
    full = clip.preprocess(image)
    assert full.dtype == torch.float32 and torch.equal(full, _reference_preprocess(image, 224))
    assert not torch.equal(low, full.bfloat16())  # rounded at every step, not once at the end
    assert 1e-3 < ((low.float() - full).norm() / full.norm()).item() < 2e-2  # the ~0.6% the audit found


@pytest.mark.gpu
def test_cuda_bf16_pixels_are_preprocessed_in_bf16(wan_ref: Path, cases: dict, tensors: dict) -> None:
    """As in Animate on CUDA: bf16 pixels, float16 tower; the steps equal the reference's in bf16 on CUDA and
    the features stay at half-precision distance from the fixtures."""
    clip = ClipVision.from_checkpoint(wan_ref / "clip" / CLIP_FILE, wan_ref / "clip" / "config.json",
                                      torch.float16, "cuda")  # fmt: skip
    for name, case in cases.items():
        image = tensors[case["inputs"]["image"]["key"]].cuda().bfloat16()
        assert torch.equal(clip.preprocess(image), _reference_preprocess(image, clip.config.image_size)), name
        want = tensors[case["expected"]["features"]["key"]]
        assert ((clip(image).float().cpu() - want).norm() / want.norm()).item() < 2e-2, name
