"""Benchmark: where one DiT forward's GPU time goes, by kernel and by kind (attention, GEMM, fused elementwise, copy).

Profiles one forward of the 14B I2V DiT (random bf16 weights, the pool's fast path: fused q/k/v + regional
compile) with torch.profiler after a warm-up, sums the device time of every kernel by name, sorts them into
kinds, and prints the kinds' shares with the forward's FLOP-limited time beside them, so that the gap between
the measured forward and the kernels' own limits can be read off. `--tiny` runs the same code on the CPU.

    python bench/bench_profile.py --size 720p --out bench/profile_720p.json
    python bench/bench_profile.py --tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, forward_flops, make_inputs, run_once, tiny_config  # noqa: E402
from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402
from pipeline.models.fast import optimize  # noqa: E402

# Kernel-name fragments per kind, checked in this order (the first match wins).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attn", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "sm90_")),
    ("compiled elementwise (triton)", ("triton",)),
    ("copy / layout", ("copy", "cat", "transpose", "memcpy", "memset", "fill")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="720p", choices=sorted(LATENTS))
    p.add_argument("--attention", default="auto", help="auto|cudnn|flash|fa3|math")
    p.add_argument("--no-compile", action="store_true", help="profile the eager fused model instead")
    p.add_argument("--top", type=int, default=25, help="kernels listed by device time")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def kernel_times(prof: profile, device: torch.device) -> dict[str, float]:
    """Device (or, on the CPU, self CPU) seconds per kernel name, summed over calls."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0 and (device.type != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA):
            totals[event.key] += us / 1e6
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, config, latent = torch.device("cpu"), torch.float32, tiny_config("i2v"), (2, 4, 8)
    elif not torch.cuda.is_available():
        print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
        return 2
    else:
        device, dtype, config, latent = torch.device("cuda"), torch.bfloat16, DiTConfig.real_14b(), LATENTS[args.size]
        attention_mod.set_backend(args.attention)
    model = optimize(build(config, device, dtype, seed=0), compile=not args.no_compile and not args.tiny)
    inputs = make_inputs(config, latent, device, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run_once(model, inputs, device)  # warm-up: compilation, kernel selection, attention self-test
    sync()
    start = time.perf_counter()
    run_once(model, inputs, device)
    sync()
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run_once(model, inputs, device)
        sync()
    per_kernel = kernel_times(prof, device)
    result = summarize(per_kernel, wall, forward_flops(config, inputs["seq_len"], animate=False), args.top)
    result.update(size="tiny" if args.tiny else args.size, attention=attention_mod.active_backend(),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_result(result)
    return 0


def summarize(per_kernel: dict[str, float], wall: float, flops: float, top: int) -> dict:
    kinds: dict[str, float] = defaultdict(float)
    for name, seconds in per_kernel.items():
        kinds[kind_of(name)] += seconds
    busy = sum(per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1])[:top]
    return {
        "forward_s": round(wall, 4), "kernels_s": round(busy, 4), "idle_s": round(max(wall - busy, 0.0), 4),
        "tflops": round(flops / wall / 1e12, 1),
        "kinds": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda item: -item[1])},
        "top": [{"kernel": name[:110], "kind": kind_of(name), "s": round(s, 4)} for name, s in ranked],
    }  # fmt: skip


def print_result(r: dict) -> None:
    print(json.dumps({k: r[k] for k in ("size", "attention", "forward_s", "kernels_s", "idle_s", "tflops")}))
    print(f"\n{'kind':<32}{'s':>9}{'share':>8}")
    for kind, seconds in r["kinds"].items():
        print(f"{kind:<32}{seconds:>9.4f}{100 * seconds / max(r['kernels_s'], 1e-12):>7.1f}%")
    print(f"\n{'kernel':<112}{'s':>9}")
    for k in r["top"]:
        print(f"{k['kernel']:<112}{k['s']:>9.4f}")


if __name__ == "__main__":
    sys.exit(main())
