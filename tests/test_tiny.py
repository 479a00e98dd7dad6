"""Tiny random checkpoints: the released layouts, loadable by our loaders, and a whole I2V job on a CPU.

Writes real files through the CLI and reads them back with the project's loaders; nothing is mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.weights.tiny import (
    REAL_I2V_SIZES,
    TinySizes,
    dit_fields,
    random_module,
    write_animate,
    write_i2v,
)
from pipeline.weights.tiny import main as tiny_main

REPO = Path(__file__).resolve().parents[1]
I2V_FILES = [
    "high_noise_model/config.json",
    "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",
    "high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors",
    "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
    "low_noise_model/config.json",
    "low_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",
    "low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors",
    "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "t5_config.json",
    "google/umt5-xxl/tokenizer.json",
    "Wan2.1_VAE.pth",
]
ANIMATE_FILES = [
    "config.json",
    "diffusion_pytorch_model-00001-of-00002.safetensors",
    "diffusion_pytorch_model-00002-of-00002.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "t5_config.json",
    "google/umt5-xxl/tokenizer.json",
    "Wan2.1_VAE.pth",
    "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "clip_config.json",
    "relighting_lora.ckpt",
]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.weights.tiny", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "i2v"
    done = _cli(str(out), "--family", "i2v", "--seed", "7")
    assert done.returncode == 0, done.stderr
    assert "wrote tiny i2v checkpoint" in done.stdout
    return out


def _index_is_consistent(folder: Path) -> int:
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    keys_by_shard: dict[str, set[str]] = {}
    total = 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / name), framework="pt") as shard:
            names = list(shard.keys())
            keys_by_shard[name] = set(names)
            for key in names:
                tensor = shard.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert len(keys_by_shard) == 2 and all(keys_by_shard.values())
    for key, shard in index["weight_map"].items():
        assert key in keys_by_shard[shard]
    assert sum(len(k) for k in keys_by_shard.values()) == len(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    return len(index["weight_map"])


def test_i2v_layout_is_the_released_one(tiny_i2v: Path) -> None:
    for name in I2V_FILES:
        assert (tiny_i2v / name).is_file(), name
    t5 = json.loads((tiny_i2v / "t5_config.json").read_text())
    for expert in ("high_noise_model", "low_noise_model"):
        config = json.loads((tiny_i2v / expert / "config.json").read_text())
        assert config["_class_name"] == "WanModel" and config["model_type"] == "i2v"
        assert config["text_dim"] == t5["dim"] and config["text_len"] == t5["text_len"]
        assert _index_is_consistent(tiny_i2v / expert) > 20
    state = torch.load(tiny_i2v / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}  # as the released file


def test_same_seed_same_weights_other_seed_other_weights(tiny_i2v: Path, tmp_path: Path) -> None:
    write_i2v(tmp_path / "again", seed=7)
    write_i2v(tmp_path / "other", seed=8)
    shard = "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors"
    read = lambda root: (root / shard).read_bytes()  # noqa: E731
    assert read(tmp_path / "again") == read(tiny_i2v)
    assert read(tmp_path / "other") != read(tiny_i2v)
    assert (tmp_path / "again" / "Wan2.1_VAE.pth").stat().st_size == (tiny_i2v / "Wan2.1_VAE.pth").stat().st_size


def test_real_sizes_are_the_released_widths() -> None:
    """--real-size writes what the released I2V-A14B holds: checked here, before any GPU time is spent on it."""
    from pipeline.models.dit import DiTConfig
    from pipeline.models.t5 import T5Config
    from pipeline.models.vae import VaeConfig

    sizes = REAL_I2V_SIZES
    assert DiTConfig.from_dict(dit_fields(sizes)) == DiTConfig.real_14b()
    assert T5Config(vocab_size=sizes.vocab, dim=sizes.t5_dim, dim_attn=sizes.t5_dim, dim_ffn=sizes.t5_ffn,
                    num_heads=sizes.t5_heads, encoder_layers=sizes.t5_layers) == T5Config()
    assert VaeConfig(dim=sizes.vae_dim) == VaeConfig() and sizes.tokenizer_vocab < sizes.vocab


def test_shared_experts_are_hard_links_that_load_as_two_experts(tmp_path: Path) -> None:
    from pipeline.weights.layouts import check_installed
    from pipeline.weights.loader import load_i2v_experts

    out = write_i2v(tmp_path / "shared", seed=3, share_experts=True)
    shards = sorted((out / "high_noise_model").glob("*.safetensors"))
    assert len(shards) == 2
    for shard in shards:
        linked = out / "low_noise_model" / shard.name
        assert linked.is_file() and not linked.is_symlink() and linked.samefile(shard)
    assert check_installed("i2v-A14B", out) == []
    high, low = load_i2v_experts(out)
    assert high is not low
    assert all(torch.equal(a, b) for a, b in zip(high.state_dict().values(), low.state_dict().values(), strict=True))


def test_random_module_off_the_cpu_float32_path_is_built_on_meta() -> None:
    from pipeline.models.dit import DiTConfig, WanDiT

    config = DiTConfig.from_dict(dit_fields(TinySizes()))
    model = random_module(lambda: WanDiT(config), 4, "cpu", torch.bfloat16)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and all(torch.isfinite(p).all() for p in params)
    assert all(p.std() > 0 for p in params if p.numel() > 1)  # every tensor was filled, none left empty
    with pytest.raises(ValueError, match="has buffers"):
        random_module(lambda: torch.nn.BatchNorm1d(4), 0, "cpu", torch.bfloat16)


def test_cli_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert tiny_main([str(tmp_path), "--family", "i2v"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_whole_i2v_job_runs_from_the_tiny_checkpoint(tiny_i2v: Path, media: Path) -> None:
    from pipeline.i2v import DEFAULT_NEGATIVE_PROMPT, I2VModels, encode_prompts, generate_i2v

    models = I2VModels.load(tiny_i2v, "cpu", torch.float32)
    progress: list[tuple[str, int, int]] = []
    video = generate_i2v(models, media / "i2v_input.jpg", "a cat on a surfboard", "", max_area=32 * 48,
                         frames=17, steps=4, shift=5.0, guide_scale=(3.5, 4.0), solver="unipc", seed=3,
                         on_progress=lambda *p: progress.append(p))
    # portrait 832x1104 within 1536 px: floor(sqrt(1536*1.33)/8/2)*2 = 4 latent rows, 4 columns -> 32x32
    assert video.shape == (3, 17, 32, 32)
    assert torch.isfinite(video).all() and video.abs().max() <= 1.0 and video.std() > 0.01
    assert [p for p in progress if p[0] == "sampling"] == [("sampling", i, 4) for i in range(1, 5)]
    # an empty negative prompt means the reference's default one, encoded by the checkpoint's T5
    _, negative = encode_prompts(models, "a cat on a surfboard", "")
    assert torch.equal(negative, models.text_encoder([DEFAULT_NEGATIVE_PROMPT])[0])


def test_animate_layout_loads_and_its_widths_fit_together(tmp_path: Path) -> None:
    from pipeline.models.animate_dit import merge_lora
    from pipeline.models.clip import ClipVision
    from pipeline.models.t5 import TextEncoder
    from pipeline.weights.loader import load_animate_dit, load_lora_state

    out = write_animate(tmp_path / "animate", seed=5)
    for name in ANIMATE_FILES:
        assert (out / name).is_file(), name
    assert _index_is_consistent(out) > 100
    model = load_animate_dit(out)
    sizes = TinySizes()
    assert model.config.clip_dim == sizes.clip_dim and model.config.text_dim == sizes.t5_dim
    clip = ClipVision.from_checkpoint(out / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    features = clip(torch.zeros(3, 40, 56))
    context = TextEncoder(out)(["a person dancing"])[0]
    assert features.shape == (1, 257, sizes.clip_dim) and context.shape[1] == sizes.t5_dim
    merged = merge_lora(model, load_lora_state(out / "relighting_lora.ckpt"))
    assert len(merged) > 0
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 4, 6, generator=gen), torch.randn(20, 3, 4, 6, generator=gen)
    face = torch.rand(1, 3, 5, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        out_v = model(x, torch.tensor([999]), context, 18, y, clip_fea=features,
                      pose_latents=torch.randn(16, 2, 4, 6, generator=gen), face_pixel_values=face)
    assert out_v.shape == (16, 3, 4, 6) and torch.isfinite(out_v).all()


@pytest.mark.gpu
def test_tiny_job_on_cuda_in_bf16_with_expert_offload(tiny_i2v: Path, media: Path) -> None:
    from pipeline.i2v import I2VModels, generate_i2v

    models = I2VModels.load(tiny_i2v, "cuda", torch.bfloat16, offload_experts=True)
    device_of = lambda m: next(m.parameters()).device.type  # noqa: E731
    assert device_of(models.high_noise) == "cpu" and device_of(models.low_noise) == "cpu"
    video = generate_i2v(models, media / "i2v_input.jpg", "a cat", "", max_area=32 * 48, frames=9, steps=4,
                         shift=5.0, guide_scale=3.5, solver="unipc", seed=1)
    assert video.is_cuda and video.shape == (3, 9, 32, 32) and torch.isfinite(video).all()
    # 4 UniPC steps at shift 5 end below the boundary: the low-noise expert is resident, the other is not
    assert device_of(models.low_noise) == "cuda" and device_of(models.high_noise) == "cpu"
