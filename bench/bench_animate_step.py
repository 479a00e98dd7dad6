"""Benchmark: one Animate-14B denoising step (DiT forward(s) + UniPC update) on a 720p 77-frame clip, with random
bf16 weights at the real size: seconds per step and peak GPU memory, on 1 GPU or over torchrun ranks (Ulysses).

Must not load or download real weights: the DiT is built on the meta device and filled with random values
directly on each GPU (34.5 GB in bf16 per rank: Ulysses splits activations, not weights). `--tiny` runs the
same code on the CPU with a tiny config (smoke test). Rank 0 prints one JSON line per measurement.

    python bench/bench_animate_step.py                                   # 1 GPU, guide scale 1 (1 forward)
    python bench/bench_animate_step.py --guide-scale 2                   # text+face guidance (2 forwards)
    python bench/bench_animate_step.py --compile                         # the pool's fast path
    torchrun --standalone --nproc-per-node 4 bench/bench_animate_step.py # Ulysses over 4 GPUs
    python bench/bench_animate_step.py --tiny                            # CPU smoke test
    torchrun --standalone --nproc-per-node 2 bench/bench_animate_step.py --tiny   # CPU, gloo, 2 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import build  # noqa: E402  (the same random 14B weights as the DiT bench)
from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models.animate_dit import AnimateConfig  # noqa: E402
from pipeline.models.fast import optimize  # noqa: E402
from pipeline.models.motion_encoder import MotionEncoderSpec  # noqa: E402
from pipeline.sampling import make_solver  # noqa: E402
from pipeline.sampling.guidance import SequentialGuidance  # noqa: E402

CLIP_TOKENS = 257
# (pixel frames of a clip, latent height, latent width): 720p = 1280x720 -> 90x160 latents; +1 reference frame.
SHAPES = {"720p": (77, 90, 160), "480p": (77, 60, 104), "tiny": (9, 4, 8)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SHAPES), default=None, help="default 720p (tiny with --tiny)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--guide-scale", type=float, default=1.0, help="> 1 adds the black-face unconditional forward")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--attention", default=None, help="auto|cudnn|flash|fa3|math (default: WANBOX_ATTENTION)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="the pool's fast path: fused q/k/v + regional compile")
    return p.parse_args(argv)


def tiny_config() -> AnimateConfig:
    spec = MotionEncoderSpec(stem=8, res_out=(16, 16, 24), style_dim=32, fc_out=(32,) * 4 + (20,),
                             direction_shape=(512, 20))
    return AnimateConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=5, text_len=16, text_dim=32, clip_dim=32,
                         face_inner_dim=32, num_face_blocks=1, motion=spec)


# ---------------------------------------------------------------------------------------------- set-up


def start_ranks(device_type: str) -> tuple[int, int, torch.device, object | None]:
    """(rank, world, device, sp) from torchrun's environment; a single process when WORLD_SIZE is unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return rank, world, device, None
    from pipeline.parallel.ulysses import UlyssesParallel

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the shared GPU hosts
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, UlyssesParallel(attention_fn=attention_mod.attention)


def clip_inputs(config: AnimateConfig, size: str, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """What generate_animate hands the DiT for one clip: noise, y, pose latents, face crops, CLIP, contexts."""
    frames, h, w = SHAPES[size]
    t = (frames - 1) // 4 + 2  # latent frames of the clip + the reference frame
    face = config.motion.input_size
    gen = torch.Generator(device=device).manual_seed(seed + 1)

    def rand(*shape: int, kind: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(kind)

    return dict(
        latent=rand(16, t, h, w), y=rand(20, t, h, w, kind=dtype), pose_latents=rand(16, t - 1, h, w),
        face=rand(1, 3, frames, face, face, kind=dtype).clamp(-1, 1), clip_fea=rand(1, CLIP_TOKENS, config.clip_dim,
        kind=dtype), context=rand(config.text_len, config.text_dim), context_null=rand(config.text_len,
        config.text_dim), seq_len=t * h * w // 4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- one step


def one_step(model: nn.Module, inputs: dict, solver_steps: int, scale: float, sp: object | None,
             device: torch.device) -> torch.Tensor:
    """A fresh solver, one guided velocity at its first timestep, one UniPC update (what every step costs)."""
    solver = make_solver("unipc", solver_steps, 5.0)
    t = solver.timesteps[:1].to(device)

    def denoise(x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return model(x, t, context, inputs["seq_len"], inputs["y"], clip_fea=inputs["clip_fea"],
                     pose_latents=inputs["pose_latents"], face_pixel_values=face, sp=sp)

    cond = {"context": inputs["context"], "face": inputs["face"]}
    null = {"context": inputs["context_null"], "face": torch.full_like(inputs["face"], -1.0)}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        v = SequentialGuidance()(denoise, inputs["latent"], t, cond, null, scale)
    return solver.step(v.float(), 0, inputs["latent"])


def measure(model: nn.Module, config: AnimateConfig, size: str, device: torch.device, dtype: torch.dtype,
            sp: object | None, args: argparse.Namespace) -> dict:
    inputs = clip_inputs(config, size, device, dtype, args.seed)
    world = getattr(sp, "world_size", 1)
    if inputs["seq_len"] % world:
        raise SystemExit(f"error: {inputs['seq_len']} tokens do not divide by {world} ranks")
    scale = args.guide_scale if args.guide_scale > 1 else 1.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    for _ in range(args.warmup):
        one_step(model, inputs, 20, scale, sp, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        sync()
        barrier()
        start = time.perf_counter()
        out = one_step(model, inputs, 20, scale, sp, device)
        sync()
        times.append(time.perf_counter() - start)
    frames, h, w = SHAPES[size]
    return {
        "bench": "animate_step", "size": size, "world_size": world, "guide_scale": scale,
        "forwards_per_step": 1 if scale == 1.0 else 2, "latent": list(inputs["latent"].shape),
        "pose_latents": list(inputs["pose_latents"].shape), "face": list(inputs["face"].shape),
        "tokens": inputs["seq_len"], "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention": attention_mod.active_backend(), "compiled": bool(args.compile), "seconds_best": round(min(times), 4),
        "seconds_all": [round(s, 4) for s in times],
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "finite": bool(torch.isfinite(out).all()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.attention:
        attention_mod.set_backend(args.attention)
    if not args.tiny and not torch.cuda.is_available():
        print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
        return 2
    rank, world, device, sp = start_ranks("cpu" if args.tiny else "cuda")
    config = tiny_config() if args.tiny else AnimateConfig.real_14b()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = args.size or ("tiny" if args.tiny else "720p")
    start = time.perf_counter()
    model = build(config, device, dtype, args.seed)
    if args.compile:
        optimize(model, compile=not args.tiny)  # the warm pool's set-up; compile stays off on the CPU
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(json.dumps({"bench": "animate_build", "params": params, "weights_gib": round(weights / 2**30, 2),
                          "world_size": world, "seconds": round(time.perf_counter() - start, 2)}), flush=True)
    result = measure(model, config, size, device, dtype, sp, args)
    if rank == 0:
        print(json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
