"""Benchmark: our I2V DiT forward against the public reference's WanModel on the same random bf16 weights,
in the same run: time, TFLOP/s, peak memory, and the numerical difference (relative L2) of the outputs.

Needs CUDA and a Wan2.2 source checkout fetched for the run (never committed), passed as --reference-src.
Our model is measured alone first (its peak includes its own weights only); the reference is then built on
the same device with our state dict loaded into it (the same key names: checkpoint compatibility).

    python bench/bench_vs_reference.py --reference-src /path/to/Wan2.2 --sizes 480p,720p --compile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, forward_flops, make_inputs, run_once  # noqa: E402
from bench.reference import build_reference_i2v, load_reference_model_module, use_reference_attention  # noqa: E402
from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402

H200_BF16_TFLOPS = 790.0  # measured dense bf16 matmul rate on one H200 (NOTES.md), the roofline we quote


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-src", type=Path, default=None, help="Wan2.2 checkout (skip the reference if absent)")
    p.add_argument("--sizes", default="480p,720p")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time ours with regional torch.compile of the blocks")
    p.add_argument("--reference-backends", default="default,cudnn",
                   help="the reference's attention: SDPA choices (default, cudnn, flash) or fa3 (its FA3 call)")
    p.add_argument("--skip-eager", action="store_true", help="time ours compiled only (needs --compile)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    return p.parse_args(argv)


def timed(fn: Callable[[], torch.Tensor], iters: int) -> tuple[list[float], float, torch.Tensor]:
    """Warm-up once, then `iters` timed calls; returns times, peak GiB during them, the last output."""
    out = fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated() / 2**30, out


def row(name: str, size: str, times: list[float], peak: float, flops: float, **extra: object) -> dict:
    best = min(times)
    return {
        "variant": name, "size": size, "seconds_best": round(best, 3), "seconds_all": [round(t, 3) for t in times],
        "tflops": round(flops / best / 1e12, 1), "pct_of_790": round(100 * flops / best / 1e12 / H200_BF16_TFLOPS, 1),
        "peak_gib": round(peak, 2), **extra,
    }  # fmt: skip


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_forward(model: torch.nn.Module, inputs: dict, backend: str) -> torch.Tensor:
    use_reference_attention(backend)
    kernels = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}
    ctx = sdpa_kernel(kernels[backend]) if backend in kernels else contextlib.nullcontext()
    with ctx, torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        return model([inputs["x"]], t=inputs["t"], context=[inputs["context"]], seq_len=inputs["seq_len"], y=[inputs["y"]])[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs CUDA", file=sys.stderr)
        return 2
    device, config = torch.device("cuda"), DiTConfig.real_14b()
    sizes = [s.strip() for s in args.sizes.split(",")]
    results: list[dict] = []
    ours = build(config, device, torch.bfloat16, seed=0)
    weights_gib = sum(p.numel() * p.element_size() for p in ours.parameters()) / 2**30
    outputs: dict[str, torch.Tensor] = {}
    if args.skip_eager and not args.compile:
        print("error: --skip-eager needs --compile (nothing of ours would be timed)", file=sys.stderr)
        return 2
    for size in [] if args.skip_eager else sizes:
        inputs = make_inputs(config, LATENTS[size], device, seed=0)
        flops = forward_flops(config, inputs["seq_len"], animate=False)
        times, peak, out = timed(lambda: run_once(ours, inputs, device), args.iters)  # noqa: B023
        results.append(row("ours", size, times, peak, flops, attention=attention_mod.active_backend()))
        outputs[size] = out.cpu()
        print(json.dumps(results[-1]), flush=True)
    if args.compile:
        for block in ours.blocks:
            block.compile()
        for size in sizes:
            inputs = make_inputs(config, LATENTS[size], device, seed=0)
            flops = forward_flops(config, inputs["seq_len"], animate=False)
            start = time.perf_counter()
            run_once(ours, inputs, device)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            times, peak, out = timed(lambda: run_once(ours, inputs, device), args.iters)  # noqa: B023
            eager = outputs.setdefault(size, out.cpu())  # with --skip-eager the compiled output is ours
            results.append(row("ours+compile", size, times, peak, flops, attention=attention_mod.active_backend(),
                               first_call_s=round(compile_s, 1), rel_l2_vs_eager=rel_l2(out.cpu(), eager)))
            print(json.dumps(results[-1]), flush=True)
    if args.reference_src is not None and args.reference_src.is_dir():
        module = load_reference_model_module(args.reference_src)
        ref_cfg = {k: getattr(config, k) for k in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim",
                                                   "num_heads", "num_layers", "eps")}  # fmt: skip
        state = {k: v for k, v in ours.state_dict().items()}
        del ours
        gc.collect()
        torch.cuda.empty_cache()
        reference = build_reference_i2v(module, ref_cfg, device, torch.bfloat16)
        reference.load_state_dict(state, strict=True, assign=True)  # raises on any key mismatch
        del state
        for backend in args.reference_backends.split(","):
            for size in sizes:
                inputs = make_inputs(config, LATENTS[size], device, seed=0)
                flops = forward_flops(config, inputs["seq_len"], animate=False)
                times, peak, out = timed(lambda: reference_forward(reference, inputs, backend), args.iters)  # noqa: B023
                diff = rel_l2(outputs[size], out.cpu())
                results.append(row(f"reference[{backend}]", size, times, peak, flops, rel_l2_ours_vs_ref=diff))
                print(json.dumps(results[-1]), flush=True)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "weights_gib": round(weights_gib, 2), "results": results}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    print(f"{'variant':<22}{'size':<7}{'best s':>9}{'TFLOP/s':>9}{'% 790':>7}{'peak GiB':>10}  rel-L2 vs ref")
    for r in results:
        print(f"{r['variant']:<22}{r['size']:<7}{r['seconds_best']:>9}{r['tflops']:>9}{r['pct_of_790']:>7}"
              f"{r['peak_gib']:>10}  {r.get('rel_l2_ours_vs_ref', '')}")  # fmt: skip
    for line in speedups(results):
        print(line)


def speedups(results: list[dict]) -> list[str]:
    """Per size and variant of ours: how many times faster than each reference variant of the same run."""
    lines = []
    for ours in (r for r in results if r["variant"].startswith("ours")):
        refs = [r for r in results if r["variant"].startswith("reference") and r["size"] == ours["size"]]
        ratios = ", ".join(f"{ref['seconds_best'] / ours['seconds_best']:.2f}x {ref['variant']}" for ref in refs)
        if ratios:
            lines.append(f"{ours['size']} {ours['variant']} {ours['seconds_best']} s: {ratios}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
