"""`python -m pipeline.weights.tiny OUT_DIR --family i2v|animate [--seed N]`: tiny random checkpoints.

Writes a complete checkpoint directory in the released layout from OUR modules at tiny sizes, so that
loaders, workers and end-to-end tests run on a CPU in seconds. The weights are seeded noise: the videos
mean nothing, and nothing here may be used as a real model.

`--family i2v --real-size` writes the same layout at the released I2V-A14B widths (two 14B experts in bf16,
umT5-xxl, the Wan2.1 VAE) for GPU runs of the whole daemon: built on the meta device, filled on the GPU and
written shard by shard, so no fp32 14B copy ever exists in host memory. `--share-experts` stores the
low-noise expert as hard links to the high-noise expert's shards (one 28.6 GB copy on disk and in the page
cache instead of two): the loader reads it as a second expert like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
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
    tokenizer_vocab: int = 0  # pieces of the written tokenizer.json; 0: vocab (the tiny tokenizer has < 20k)


# The released Wan2.2-I2V-A14B widths (DiTConfig.real_14b, T5Config's defaults, the Wan2.1 VAE). The tokenizer
# is the tiny one (no download): its 4096 pieces are valid ids of the real 256384-row embedding.
REAL_I2V_SIZES = TinySizes(dit_dim=5120, dit_ffn=13824, dit_heads=40, dit_layers=40, text_len=512, t5_dim=4096,
                           t5_ffn=10240, t5_heads=64, t5_layers=24, vocab=256384, vae_dim=96, tokenizer_vocab=4096)
REAL_DIT_SHARDS = 6  # as the released experts are split


# ---------------------------------------------------------------------------------------------- weights


def fill_random(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with seeded values of a sensible scale; buffers (blur kernels) are kept.

    Norm scales ~ 1 + 0.1 N, biases ~ 0.05 N, modulation tables ~ N / sqrt(dim), weights ~ N / sqrt(fan_in).
    """
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=device)
            param.copy_(_scaled(name, param, noise))
    return module


def random_module(factory: Callable[[], nn.Module], seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> nn.Module:  # fmt: skip
    """factory() filled by fill_random. Elsewhere than float32 on the CPU it is built on the meta device and
    allocated on `device` in `dtype` first (a 14B model is never materialised in fp32 on the host)."""
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return fill_random(factory(), seed)  # the tiny path: the same numbers as ever
    with torch.device("meta"):
        module = factory()
    if any(True for _ in module.buffers()):  # to_empty would leave them unset
        raise ValueError(f"{type(module).__name__} has buffers; build it on the CPU in float32 instead")
    return fill_random(module.to(dtype).to_empty(device=device), seed)


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


def state_of(module: nn.Module, dtype: torch.dtype = torch.float32, host: bool = True) -> dict[str, torch.Tensor]:
    """A plain, contiguous state dict (floats cast to dtype), as the released files hold. host=False keeps the
    tensors where they are (write_sharded moves one shard at a time to the host)."""
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu") if host else value.detach()
        value = (value.to(dtype) if value.is_floating_point() else value).contiguous()
        out[key] = value.clone() if host else value
    return out


# ---------------------------------------------------------------------------------------------- writers


def write_sharded(folder: Path, state: dict[str, torch.Tensor], config: dict, count: int = DIT_SHARDS) -> None:
    """config.json + `count` safetensors shards + the index, as diffusers' save_pretrained writes them.
    Tensors may be on a GPU: each shard is copied to the host just before it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total = sum(t.numel() * t.element_size() for t in state.values())
    names = [f"{DIT_WEIGHTS}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    shards: list[list[str]] = [[] for _ in names]
    per_shard = math.ceil(len(state) / count)  # contiguous runs of keys; every shard gets some
    for position, key in enumerate(state):
        shards[position // per_shard].append(key)
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        save_file({key: state[key].to("cpu") for key in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{DIT_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def link_expert(source: Path, dest: Path) -> str:
    """dest: a second DiT folder whose config.json and index are copies and whose shards are hard links to
    source's (symbolic links where the filesystem has none). Returns "hardlink" or "symlink"."""
    dest.mkdir(parents=True, exist_ok=True)
    how = "hardlink"
    for item in sorted(source.iterdir()):
        if item.suffix != ".safetensors":
            (dest / item.name).write_bytes(item.read_bytes())
            continue
        try:
            os.link(item, dest / item.name)
        except OSError:
            os.symlink(item.resolve(), dest / item.name)
            how = "symlink"
    return how


def write_text_encoder(out: Path, sizes: TinySizes, seed: int, device: torch.device | str = "cpu") -> None:
    """umT5 encoder .pth (bf16, as released) + t5_config.json (sizes and text_len) + tokenizer.json."""
    from pipeline.models.t5 import T5Config, T5Encoder
    from pipeline.models.tokenizer import write_tiny_tokenizer

    config = T5Config(vocab_size=sizes.vocab, dim=sizes.t5_dim, dim_attn=sizes.t5_dim, dim_ffn=sizes.t5_ffn,
                      num_heads=sizes.t5_heads, encoder_layers=sizes.t5_layers, num_buckets=32, shared_pos=False)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    encoder = random_module(lambda: T5Encoder(config), seed, device, dtype)
    torch.save(state_of(encoder, torch.bfloat16), out / T5_FILE)
    del encoder
    (out / T5_CONFIG).write_text(json.dumps({**asdict(config), "text_len": sizes.text_len}, indent=2) + "\n")
    write_tiny_tokenizer(out / TOKENIZER_DIR, sizes.tokenizer_vocab or sizes.vocab)


def write_vae(out: Path, sizes: TinySizes, seed: int, device: torch.device | str = "cpu") -> None:
    from pipeline.models.vae import VaeConfig, VideoVAE

    vae = random_module(lambda: VideoVAE(VaeConfig(dim=sizes.vae_dim)), seed, device)
    torch.save(state_of(vae), out / VAE_FILE)


def dit_fields(sizes: TinySizes) -> dict:
    """The DiT config.json fields. text_dim is written too: the tiny T5 is not 4096 wide."""
    return {"model_type": "i2v", "text_len": sizes.text_len, "in_dim": 36, "dim": sizes.dit_dim,
            "ffn_dim": sizes.dit_ffn, "freq_dim": 256, "text_dim": sizes.t5_dim, "out_dim": 16,
            "num_heads": sizes.dit_heads, "num_layers": sizes.dit_layers, "eps": 1e-6}


def write_i2v(out: Path, seed: int = 0, sizes: TinySizes | None = None, device: torch.device | str = "cpu",
              shards: int = DIT_SHARDS, share_experts: bool = False) -> Path:  # fmt: skip
    """The Wan2.2-I2V-A14B layout: two experts, T5 + tokenizer, VAE. On a GPU `device` the experts and T5 are
    written in bf16 (the VAE in float32, as released); share_experts: link_expert for the low-noise one."""
    from pipeline.models.dit import DiTConfig, WanDiT

    sizes = sizes or TinySizes()
    out.mkdir(parents=True, exist_ok=True)
    fields = dit_fields(sizes)
    config = DiTConfig.from_dict(fields)
    on_host = torch.device(device).type == "cpu"
    dtype = torch.float32 if on_host else torch.bfloat16
    meta = {"_class_name": "WanModel", "_diffusers_version": DIFFUSERS_VERSION, **fields}
    for offset, expert in enumerate(("high_noise_model", "low_noise_model")):
        if share_experts and offset:
            link_expert(out / "high_noise_model", out / expert)
            continue
        model = random_module(lambda: WanDiT(config), seed * 100 + offset + 1, device, dtype)
        write_sharded(out / expert, state_of(model, dtype, host=on_host), meta, shards)
        del model
    write_text_encoder(out, sizes, seed * 100 + 11, device)
    write_vae(out, sizes, seed * 100 + 12, device)
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
    parser.add_argument("--real-size", action="store_true",
                        help="i2v: the released 14B widths, bf16, built on --device (a GPU; 69 GB on disk, 40 GB shared)")
    parser.add_argument("--device", default="cuda", help="with --real-size: where the weights are made")
    parser.add_argument("--share-experts", action="store_true",
                        help="i2v: the low-noise expert's shards are hard links to the high-noise expert's")
    args = parser.parse_args(argv)
    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"{out}: exists and is not an empty directory; choose a new OUT_DIR", file=sys.stderr)
        return 2
    if args.real_size and args.family != "i2v":
        print(f"--real-size: family {args.family!r}, expected 'i2v' (the only real-size layout written)",
              file=sys.stderr)
        return 2
    if args.family == "i2v" and args.real_size:
        write_i2v(out, args.seed, REAL_I2V_SIZES, args.device, REAL_DIT_SHARDS, args.share_experts)
    elif args.family == "i2v":
        write_i2v(out, args.seed, share_experts=args.share_experts)
    else:
        write_animate(out, args.seed, TinySizes(face_size=args.face_size))
    files = {p.stat().st_ino: p.stat().st_size for p in out.rglob("*") if p.is_file()}  # hard links once
    label = "real-size" if args.real_size else "tiny"
    print(f"wrote {label} {args.family} checkpoint to {out} ({sum(files.values()) / 1e6:.1f} MB on disk, "
          f"seed {args.seed}{', experts share their shards' if args.share_experts else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
