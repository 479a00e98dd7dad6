"""Benchmark: Wan2.1 VAE decode (and optionally encode) of 81 frames at 720p with real-size random weights,
float32 vs bfloat16, time and peak GPU memory; `--tiny` smoke-tests the same code on the CPU.

Must not load or download real weights; it only prints one JSON line per measurement.

    python bench/bench_vae.py                 # CUDA: latent [16, 21, 90, 160] -> video [3, 81, 720, 1280]
    python bench/bench_vae.py --encode        # also encode the 81-frame video (what I2V does for y)
    python bench/bench_vae.py --tiny          # CPU: dim 12, latent [16, 3, 4, 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.models.vae import VaeConfig, VideoVAE, WanVAE  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test at dim 12 and a 3x4x6 latent")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--dim", type=int, default=96, help="VAE base width (real: 96)")
    p.add_argument("--latent", default="21,90,160", help="latent frames,height,width (720p 81 frames)")
    p.add_argument("--encode", action="store_true", help="also time encoding the decoded-size video")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--no-tf32",
        action="store_true",
        help="forbid TF32 in float32 convs (torch's default, which the reference runs with, allows it)",
    )
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.latent = 12, "3,4,6"
    return args


def build_vae(dim: int, dtype: torch.dtype, device: str, seed: int) -> WanVAE:
    torch.manual_seed(seed)
    model = VideoVAE(VaeConfig(dim=dim))  # default torch init: random, real architecture
    return WanVAE(model, dtype=dtype, device=device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, repeats: int) -> tuple[float, float | None, torch.Tensor]:
    """Best wall time over `repeats` and the peak GPU memory of the runs (GiB)."""
    best, out = float("inf"), None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return best, peak, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        print("bench_vae: CUDA not available; use --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    if device == "cuda":
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    frames, height, width = (int(v) for v in args.latent.split(","))
    gen = torch.Generator().manual_seed(args.seed)
    latent = torch.randn(16, frames, height, width, generator=gen).to(device)
    tf32 = device == "cuda" and torch.backends.cudnn.allow_tf32
    for name in args.dtypes.split(","):
        vae = build_vae(args.dim, DTYPES[name], device, args.seed)
        vae.decode(latent[:, :2])  # warm-up: kernels, cuDNN algorithm search
        seconds, peak, video = measure(lambda v=vae: v.decode(latent), device, args.repeats)
        row = {
            "op": "decode", "dtype": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dim": args.dim, "latent": list(latent.shape), "video": list(video.shape),
            "seconds": round(seconds, 3), "frames_per_s": round(video.shape[1] / seconds, 2),
            "peak_gib": None if peak is None else round(peak, 2), "cudnn_tf32": tf32,
            "finite": bool(torch.isfinite(video).all()),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        if args.encode:
            seconds, peak, lat = measure(lambda v=vae, x=video: v.encode(x), device, args.repeats)
            row.update(op="encode", seconds=round(seconds, 3), latent=list(lat.shape),
                       frames_per_s=round(video.shape[1] / seconds, 2),
                       peak_gib=None if peak is None else round(peak, 2))  # fmt: skip
            print(json.dumps(row), flush=True)
        del vae, video
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
