"""Benchmark: one DiT forward (I2V expert or Animate) at real size with random bf16 weights: time, TFLOP/s,
peak memory; `--tiny` smoke-tests the same code on the CPU.

Must not load or download real weights; the model is built on the meta device and materialised directly on
the GPU in bf16 (no fp32 14B copy on the CPU). Prints one JSON line per measurement.

    python bench/bench_dit_forward.py                      # I2V expert, 480p (latent [16, 21, 60, 104])
    python bench/bench_dit_forward.py --sizes 480p,720p    # also 720p (latent [16, 21, 90, 160])
    python bench/bench_dit_forward.py --family animate     # one Animate step on a 720p 77-frame clip
    python bench/bench_dit_forward.py --tiny               # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models.animate_dit import AnimateConfig, WanAnimateDiT  # noqa: E402
from pipeline.models.dit import DiTConfig, WanDiT  # noqa: E402
from pipeline.models.motion_encoder import Blur, MotionEncoderSpec  # noqa: E402

LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160), "tiny": (3, 6, 8)}
CLIP_TOKENS = 257


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("i2v", "animate"), default="i2v")
    p.add_argument("--sizes", default=None, help="comma list of 480p, 720p (default: 480p; animate: 720p)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--attention", default=None, help="auto|cudnn|flash|fa3|math (default: WANBOX_ATTENTION)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def tiny_config(family: str) -> DiTConfig:
    base = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=5, text_len=16)
    if family == "i2v":
        return DiTConfig(**base)
    spec = MotionEncoderSpec(stem=8, res_out=(16, 16, 24), style_dim=32, fc_out=(32,) * 4 + (20,), direction_shape=(512, 20))
    return AnimateConfig(**base, face_inner_dim=32, num_face_blocks=1, motion=spec)


def build(config: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build on the meta device, allocate on `device` in `dtype`, fill with seeded random values in place."""
    with torch.device("meta"):
        model = WanAnimateDiT(config) if isinstance(config, AnimateConfig) else WanDiT(config)
    model = model.to(dtype).to_empty(device=device)  # cast on meta first: no fp32 copy anywhere
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation") or name.endswith("padding_tokens"):
                p.normal_(0, 1 / math.sqrt(config.dim), generator=gen)
            elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1 or name.endswith(".bias"):
                p.normal_(0, 0.02, generator=gen)
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
        for module in model.modules():
            if isinstance(module, Blur):  # the FIR is a fixed buffer, not a weight
                k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
                module.kernel.copy_(torch.outer(k, k) / 64)
    return model.eval().requires_grad_(False)


def make_inputs(config: DiTConfig, grid: tuple[int, int, int], device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    t, h, w = grid
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    inputs = dict(
        x=rand(16, t, h, w), y=rand(config.in_dim - 16, t, h, w), context=rand(config.text_len, config.text_dim),
        t=torch.tensor([999], device=device), seq_len=t * h * w // math.prod(config.patch_size),
    )  # fmt: skip
    if isinstance(config, AnimateConfig):
        size = config.motion.input_size
        inputs |= dict(
            clip_fea=rand(1, CLIP_TOKENS, config.clip_dim), pose_latents=rand(config.pose_dim, t - 1, h, w),
            face_pixel_values=rand(1, 3, 4 * (t - 1) - 3, size, size).clamp(-1, 1),
        )  # fmt: skip
    return inputs


def forward_flops(config: DiTConfig, tokens: int, animate: bool) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections, FFN, self- and cross-attention."""
    d, f, n = config.dim, config.ffn_dim, config.text_len
    per_block = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f)  # self q,k,v,o; cross q,o; ffn
    per_block += 2 * n * 2 * d * d + 4 * tokens * tokens * d + 4 * tokens * n * d  # text k,v; attention
    if animate:
        per_block += 2 * CLIP_TOKENS * 2 * d * d + 4 * tokens * CLIP_TOKENS * d
    return config.num_layers * per_block


def run_once(model: nn.Module, inputs: dict, device: torch.device) -> torch.Tensor:
    kw = {k: inputs[k] for k in ("clip_fea", "pose_latents", "face_pixel_values") if k in inputs}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(inputs["x"], inputs["t"], inputs["context"], inputs["seq_len"], inputs["y"], **kw)


def measure(model: nn.Module, config: DiTConfig, size: str, device: torch.device, args: argparse.Namespace) -> dict:
    inputs = make_inputs(config, LATENTS[size], device, args.seed)
    for _ in range(args.warmup):
        run_once(model, inputs, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        out = run_once(model, inputs, device)
        sync()
        times.append(time.perf_counter() - start)
    best = min(times)
    flops = forward_flops(config, inputs["seq_len"], isinstance(config, AnimateConfig))
    return {
        "bench": "dit_forward", "family": args.family, "size": size, "latent": [16, *LATENTS[size]],
        "tokens": inputs["seq_len"], "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "attention": attention_mod.active_backend(), "seconds_best": round(best, 4),
        "seconds_all": [round(s, 4) for s in times], "tflops": round(flops / best / 1e12, 1),
        "pflop_per_forward": round(flops / 1e15, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "finite": bool(torch.isfinite(out).all()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.attention:
        attention_mod.set_backend(args.attention)
    if args.tiny:
        device, config, sizes = torch.device("cpu"), tiny_config(args.family), ["tiny"]
        dtype = torch.float32
    else:
        if not torch.cuda.is_available():
            print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = AnimateConfig.real_14b() if args.family == "animate" else DiTConfig.real_14b()
        sizes = (args.sizes or ("720p" if args.family == "animate" else "480p")).split(",")
    start = time.perf_counter()
    model = build(config, device, dtype, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"bench": "dit_build", "family": args.family, "params": params,
                      "seconds": round(time.perf_counter() - start, 2)}), flush=True)
    for size in sizes:
        print(json.dumps(measure(model, config, size.strip(), device, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
