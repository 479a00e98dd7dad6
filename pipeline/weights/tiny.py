"""`python -m pipeline.weights.tiny OUT_DIR --family i2v|animate [--seed N]`: tiny random checkpoints.

Writes a complete checkpoint directory in the released layout from OUR modules at tiny sizes, so that
loaders, workers and end-to-end tests run on a CPU in seconds. The weights are seeded noise: the videos
mean nothing, and nothing here may be used as a real model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

DIT_SHARDS = 2
DIT_WEIGHTS = "diffusion_pytorch_model"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_CONFIG = "t5_config.json"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_CONFIG = "clip_config.json"
LORA_FILE = "relighting_lora.ckpt"
DIFFUSERS_VERSION = "0.35.1"


@dataclass(frozen=True)
class TinySizes:
    """Widths of every tiny part. The DiT's text_dim is the T5 width; Animate's image width is the CLIP's."""

    dit_dim: int = 32
    dit_ffn: int = 64
    dit_heads: int = 2
    dit_layers: int = 2
    text_len: int = 32
    t5_dim: int = 32
    t5_ffn: int = 64
    t5_heads: int = 4
    t5_layers: int = 2
    vocab: int = 256
    vae_dim: int = 8
    clip_dim: int = 32
    clip_heads: int = 2
    clip_layers: int = 3
    face_inner: int = 16
    face_size: int = 32  # face crop side the motion encoder takes (the released model: 512)
    lora_rank: int = 4


# ---------------------------------------------------------------------------------------------- weights


def fill_random(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with seeded values of a sensible scale; buffers (blur kernels) are kept.

    Norm scales ~ 1 + 0.1 N, biases ~ 0.05 N, modulation tables ~ N / sqrt(dim), weights ~ N / sqrt(fan_in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_(_scaled(name, param, noise))
    return module


def _scaled(name: str, param: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if leaf == "gamma" or (leaf == "weight" and "norm" in owner and param.ndim == 1):
        return 1 + 0.1 * noise
    if param.ndim <= 1:
        return 0.05 * noise
    if "modulation" in name:
        return noise / math.sqrt(param.shape[-1])
    return noise / math.sqrt(max(1, param[0].numel()))


def state_of(module: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain, contiguous state dict (floats cast to dtype), as the released files hold."""
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu")
        out[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous().clone()
    return out


# ---------------------------------------------------------------------------------------------- writers


def write_sharded(folder: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """config.json + DIT_SHARDS safetensors shards + the index, as diffusers' save_pretrained writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total = sum(t.numel() * t.element_size() for t in state.values())
    names = [f"{DIT_WEIGHTS}-{i + 1:05d}-of-{DIT_SHARDS:05d}.safetensors" for i in range(DIT_SHARDS)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in names]
    per_shard = math.ceil(len(state) / DIT_SHARDS)  # contiguous runs of keys; every shard gets some
    for position, (key, tensor) in enumerate(state.items()):
        shards[position // per_shard][key] = tensor
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{DIT_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_text_encoder(out: Path, sizes: TinySizes, seed: int) -> None:
    """umT5 encoder .pth (bf16, as released) + t5_config.json (sizes and text_len) + tokenizer.json."""
    from pipeline.models.t5 import T5Config, T5Encoder
    from pipeline.models.tokenizer import write_tiny_tokenizer

    config = T5Config(vocab_size=sizes.vocab, dim=sizes.t5_dim, dim_attn=sizes.t5_dim, dim_ffn=sizes.t5_ffn,
                      num_heads=sizes.t5_heads, encoder_layers=sizes.t5_layers, num_buckets=32, shared_pos=False)
    encoder = fill_random(T5Encoder(config), seed)
    torch.save(state_of(encoder, torch.bfloat16), out / T5_FILE)
    (out / T5_CONFIG).write_text(json.dumps({**asdict(config), "text_len": sizes.text_len}, indent=2) + "\n")
    write_tiny_tokenizer(out / TOKENIZER_DIR, sizes.vocab)


def write_vae(out: Path, sizes: TinySizes, seed: int) -> None:
    from pipeline.models.vae import VaeConfig, VideoVAE

    torch.save(state_of(fill_random(VideoVAE(VaeConfig(dim=sizes.vae_dim)), seed)), out / VAE_FILE)


def dit_fields(sizes: TinySizes) -> dict:
    """The DiT config.json fields. text_dim is written too: the tiny T5 is not 4096 wide."""
    return {"model_type": "i2v", "text_len": sizes.text_len, "in_dim": 36, "dim": sizes.dit_dim,
            "ffn_dim": sizes.dit_ffn, "freq_dim": 256, "text_dim": sizes.t5_dim, "out_dim": 16,
            "num_heads": sizes.dit_heads, "num_layers": sizes.dit_layers, "eps": 1e-6}


def write_i2v(out: Path, seed: int = 0, sizes: TinySizes | None = None) -> Path:
    """The Wan2.2-I2V-A14B layout: two experts, T5 + tokenizer, VAE."""
    from pipeline.models.dit import DiTConfig, WanDiT

    sizes = sizes or TinySizes()
    out.mkdir(parents=True, exist_ok=True)
    fields = dit_fields(sizes)
    config = DiTConfig.from_dict(fields)
    for offset, expert in enumerate(("high_noise_model", "low_noise_model")):
        model = fill_random(WanDiT(config), seed * 100 + offset + 1)
        write_sharded(out / expert, state_of(model),
                      {"_class_name": "WanModel", "_diffusers_version": DIFFUSERS_VERSION, **fields})
    write_text_encoder(out, sizes, seed * 100 + 11)
    write_vae(out, sizes, seed * 100 + 12)
    return out


# ---------------------------------------------------------------------------------------------- animate


def tiny_motion_spec(motion_dim: int = 512, face_size: int = 32):  # noqa: ANN201 - MotionEncoderSpec, lazily
    """Motion encoder at face_size² crops (32: the fixture's reduced widths; 512: the real input size with
    narrow layers, so that real preprocessing output runs end to end); the 512-d motion vector is real."""
    from pipeline.models.motion_encoder import MotionEncoderSpec

    blocks = int(math.log2(face_size // 4))
    if face_size < 8 or 4 * 2**blocks != face_size:
        raise ValueError(f"face_size {face_size}: expected 4 * 2**n, e.g. 32 or 512")
    res_out = ((8,) * max(blocks - 3, 0) + (16, 16, 24))[-blocks:]  # 32: (16, 16, 24), the fixture's widths
    return MotionEncoderSpec(stem=8, res_out=res_out, style_dim=32, fc_out=(32, 32, 32, 32, 20),
                             direction_shape=(motion_dim, 20))


def write_clip(out: Path, sizes: TinySizes, seed: int) -> None:
    """The whole-CLIP .pth layout (visual.* with every block, post_norm, head, log_scale) + clip_config.json."""
    from pipeline.models.clip import Block, ClipVisionConfig, VisionTower

    config = ClipVisionConfig(vision_dim=sizes.clip_dim, vision_heads=sizes.clip_heads,
                              vision_layers=sizes.clip_layers)
    tower = fill_random(VisionTower(config), seed)
    state = {f"visual.{k}": v for k, v in state_of(tower).items()}
    last = fill_random(Block(config), seed + 1)  # the last block: in the file, unused by Wan
    state.update({f"visual.transformer.{sizes.clip_layers - 1}.{k}": v for k, v in state_of(last).items()})
    extra = fill_random(nn.ModuleDict({"post_norm": nn.LayerNorm(sizes.clip_dim)}), seed + 2)
    state.update({f"visual.{k}": v for k, v in state_of(extra).items()})
    state["visual.head"] = torch.randn(sizes.clip_dim, sizes.clip_dim,
                                       generator=torch.Generator().manual_seed(seed + 3)) / sizes.clip_dim**0.5
    state["log_scale"] = torch.tensor(math.log(1 / 0.07))
    torch.save(state, out / CLIP_FILE)
    (out / CLIP_CONFIG).write_text(json.dumps(asdict(config), indent=2) + "\n")


def animate_fields(sizes: TinySizes) -> dict:
    """Every constructor argument, as WanAnimateModel's config.json carries them."""
    return {"patch_size": [1, 2, 2], "text_len": sizes.text_len, "in_dim": 36, "dim": sizes.dit_dim,
            "ffn_dim": sizes.dit_ffn, "freq_dim": 256, "text_dim": sizes.t5_dim, "out_dim": 16,
            "num_heads": sizes.dit_heads, "num_layers": sizes.dit_layers, "window_size": [-1, -1],
            "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "motion_encoder_dim": 512,
            "use_context_parallel": False, "use_img_emb": True}


def lora_state(model: nn.Module, targets: Iterable[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """relighting_lora.ckpt keys: `<path>.lora_A.default.weight` [rank, in], `lora_B` [out, rank]."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    state = {}
    for path in targets:
        layer = modules[path]
        state[f"{path}.lora_A.default.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.05
        state[f"{path}.lora_B.default.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.05
    return state


def write_animate(out: Path, seed: int = 0, sizes: TinySizes | None = None) -> Path:
    """The Wan2.2-Animate-14B layout: DiT at the root, T5 + tokenizer, VAE, CLIP, relighting LoRA."""
    from dataclasses import replace

    from pipeline.models.animate_dit import AnimateConfig, WanAnimateDiT, lora_targets

    sizes = sizes or TinySizes()
    out.mkdir(parents=True, exist_ok=True)
    fields = animate_fields(sizes)
    base = AnimateConfig.from_dict(fields)
    config = replace(base, clip_dim=sizes.clip_dim, face_inner_dim=sizes.face_inner,
                     num_face_blocks=_face_blocks(sizes.dit_layers), motion=tiny_motion_spec(face_size=sizes.face_size))
    model = fill_random(WanAnimateDiT(config), seed * 100 + 21)
    write_sharded(out, state_of(model),
                  {"_class_name": "WanAnimateModel", "_diffusers_version": DIFFUSERS_VERSION, **fields})
    lora = lora_state(model, lora_targets(model), sizes.lora_rank, seed * 100 + 22)
    torch.save({"state_dict": lora}, out / LORA_FILE)
    write_text_encoder(out, sizes, seed * 100 + 23)
    write_vae(out, sizes, seed * 100 + 24)
    write_clip(out, sizes, seed * 100 + 25)
    return out


def _face_blocks(layers: int) -> int:
    from pipeline.models.animate_dit import FACE_BLOCK_EVERY

    return math.ceil(layers / FACE_BLOCK_EVERY)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.weights.tiny",
                                     description="Write a tiny random checkpoint in the released layout.")
    parser.add_argument("out_dir", type=Path, help="directory to create (must be empty or absent)")
    parser.add_argument("--family", required=True, choices=("i2v", "animate"))
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--face-size", type=int, default=32,
                        help="animate: face crop side of the motion encoder (512 takes real preprocessing output)")
    args = parser.parse_args(argv)
    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"{out}: exists and is not an empty directory; choose a new OUT_DIR", file=sys.stderr)
        return 2
    if args.family == "i2v":
        write_i2v(out, args.seed)
    else:
        write_animate(out, args.seed, TinySizes(face_size=args.face_size))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote tiny {args.family} checkpoint to {out} ({size / 1e6:.1f} MB, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
