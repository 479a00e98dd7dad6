"""Benchmark: the fast path (pipeline/models/fast.py) on the 14B I2V DiT with random bf16 weights: plain eager,
fused-q/k/v eager, and optimize(compile=True) at 480p and 720p, plus the attention kernels and q/k/v GEMMs alone.

Must not load or download real weights, and must fit in ~4 minutes on one H200 with the default variants
(720p forward ~12 s: warm-up + best of 2 per variant). `--tiny` runs the same code on the CPU (smoke test).

    python bench/bench_fast.py                       # 480p,720p; variants plain,fused,compiled; kernel table
    python bench/bench_fast.py --variants plain,compiled,compiled-bhld --sizes 720p
    python bench/bench_fast.py --tiny                # CPU smoke test (tiny config, float32)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, forward_flops, make_inputs, run_once, tiny_config  # noqa: E402
from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models.dit import DiTConfig, WanDiT  # noqa: E402
from pipeline.models.fast import fused_blocks, optimize  # noqa: E402

H200_BF16_TFLOPS = 790.0  # measured dense bf16 matmul rate on one H200 (NOTES.md)
TARGETS_S = {"480p": 2.8, "720p": 10.5}  # issue 6: one forward on one H200
TARGET_PEAK_GIB = 45.0
# name -> optimize() arguments; applied in the order given, in place on one model
VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "fused": dict(compile=False, fuse_qkv=True),
    "compiled-unfused": dict(compile=True, fuse_qkv=False),
    "compiled": dict(compile=True, fuse_qkv=True),
    "compiled-bhld": dict(compile=True, fuse_qkv=True, attention_layout="bhld"),
}
LAYOUTS = ("blhd", "blhd+packed-v", "bhld")  # q/k/v layouts the kernel table can feed (see _attention_inputs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="480p,720p")
    p.add_argument("--variants", default="plain,fused,compiled", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--attention", default="cudnn", help="auto|cudnn|flash|fa3|math")
    p.add_argument("--no-kernels", action="store_true", help="skip the attention / GEMM kernel table")
    p.add_argument("--kernel-backends", default="cudnn,flash,fa3", help="attention backends in the kernel table")
    p.add_argument("--kernel-layouts", default=",".join(LAYOUTS), help="q/k/v memory layouts in the kernel table")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--out", type=Path, default=None, help="also write every result as JSON here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], torch.Tensor], iters: int, device: torch.device
) -> tuple[list[float], float | None, torch.Tensor]:
    """Warm-up once (its time returned first), then `iters` timed calls; times, peak GiB, last output."""
    start = time.perf_counter()
    out = fn()
    sync(device)
    times = [time.perf_counter() - start]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(iters):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return times, peak, out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure_variants(model: WanDiT, config: DiTConfig, sizes: list[str], args: argparse.Namespace,
                     device: torch.device) -> list[dict]:  # fmt: skip
    results: list[dict] = []
    baseline: dict[str, torch.Tensor] = {}
    for name in args.variants.split(","):
        name = name.strip()
        if name not in VARIANTS:
            raise SystemExit(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}")
        if VARIANTS[name] is not None:
            optimize(model, **VARIANTS[name])
        for size in sizes:
            inputs = make_inputs(config, LATENTS[size], device, seed=0)
            flops = forward_flops(config, inputs["seq_len"], animate=False)
            times, peak, out = timed(lambda i=inputs: run_once(model, i, device), args.iters, device)
            best = min(times[1:])
            out = out.cpu()
            baseline.setdefault(size, out)
            results.append({
                "variant": name, "size": size, "seconds_best": round(best, 3),
                "seconds_all": [round(t, 3) for t in times[1:]], "first_call_s": round(times[0], 2),
                "tflops": round(flops / best / 1e12, 1), "pct_of_790": round(100 * flops / best / 1e12 / H200_BF16_TFLOPS, 1),
                "peak_gib": None if peak is None else round(peak, 2), "rel_l2_vs_first": rel_l2(out, baseline[size]),
                "fused_blocks": fused_blocks(model), "attention": attention_mod.active_backend(),
                "finite": bool(torch.isfinite(out).all()),
            })  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    return results


def measure_kernels(config: DiTConfig, sizes: list[str], device: torch.device, dtype: torch.dtype,
                    backends: list[str], layouts: list[str]) -> list[dict]:  # fmt: skip
    """Self-attention alone per backend and memory layout, the q/k/v projections fused vs three GEMMs, and any
    flash-attention implementation torch can plug into SDPA here (FA3/FA4 via torch.nn.attention)."""
    rows: list[dict] = []
    backends = backends if device.type == "cuda" else ["sdpa"]
    for size in sizes:
        inputs, tokens = _attention_inputs(config, size, device, dtype, layouts)
        for backend in backends:
            if _use_backend(backend, device):
                rows += _time_attention(f"attention[{backend}]", size, inputs, tokens, config, device)
            else:
                rows.append(_unavailable(f"attention[{backend}]", size, "failed its self-test or is not installed"))
        del inputs
        rows += _time_qkv_gemms(config, size, tokens, device, dtype)
    for impl in _flash_impls() if device.type == "cuda" else []:
        try:
            torch.nn.attention.activate_flash_attention_impl(impl)  # process-wide: measured last
        except Exception as exc:  # an optional kernel package is missing: report, keep going
            rows.append(_unavailable(f"attention[flash:{impl}]", ",".join(sizes), f"{type(exc).__name__}: {exc}"[:120]))
            continue
        for size in sizes:
            inputs, tokens = _attention_inputs(config, size, device, dtype, layouts)
            if _use_backend("flash", device):
                rows += _time_attention(f"attention[flash:{impl}]", size, inputs, tokens, config, device)
    return rows


def _attention_inputs(config: DiTConfig, size: str, device: torch.device, dtype: torch.dtype,
                      wanted: list[str]) -> tuple[dict, int]:  # fmt: skip
    t, h, w = LATENTS[size]
    tokens = t * h * w // 4
    gen = torch.Generator(device=device).manual_seed(0)
    heads = (config.num_heads, config.head_dim)
    qkv = torch.randn(3, 1, tokens, *heads, device=device, dtype=dtype, generator=gen)
    packed = qkv.permute(1, 2, 0, 3, 4).flatten(2).contiguous()  # [1, L, 3*dim]: the fused GEMM's output
    layouts = {
        "blhd": tuple(qkv),  # what the plain model feeds
        "blhd+packed-v": (qkv[0], qkv[1], packed.chunk(3, dim=-1)[2].unflatten(2, heads)),  # the fused path
        "bhld": tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv),  # head-major
    }
    return {name: layouts[name] for name in wanted}, tokens


def _use_backend(backend: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    attention_mod._checked.pop(backend, None)  # run its self-test again (an impl may have been swapped in)
    attention_mod.set_backend(backend)
    return attention_mod.active_backend() == backend


def _time_attention(label: str, size: str, layouts: dict, tokens: int, config: DiTConfig,
                    device: torch.device) -> list[dict]:  # fmt: skip
    rows, want = [], None
    flops = 4 * tokens * tokens * config.head_dim * config.num_heads
    for layout, (q, k, v) in layouts.items():
        try:
            times, _, out = timed(lambda q=q, k=k, v=v, n=tokens: attention_mod.attention(q, k, v, n), 3, device)
        except Exception as exc:  # a kernel may refuse a layout, a plugged-in impl may fail: report, go on
            rows.append(_unavailable(f"{label} {layout}", size, f"{exc}"[:120]))
            continue
        want = out if want is None else want
        best = min(times[1:])
        rows.append({"kernel": label, "layout": layout, "size": size, "ms_best": round(1e3 * best, 2),
                     "tflops": round(flops / best / 1e12, 1), "rel_l2_vs_blhd": rel_l2(out, want)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _time_qkv_gemms(config: DiTConfig, size: str, tokens: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(1)
    dim = config.dim
    x = torch.randn(tokens, dim, device=device, dtype=dtype, generator=gen)
    weights = torch.randn(3 * dim, dim, device=device, dtype=dtype, generator=gen) / dim**0.5
    rows = []
    for name, fn in (("qkv fused [L,d]x[d,3d]", lambda: x @ weights.T),
                     ("qkv as 3 GEMMs", lambda: [x @ part.T for part in weights.chunk(3)][-1])):  # fmt: skip
        times, _, _ = timed(fn, 5, device)
        best = min(times[1:])
        rows.append({"kernel": name, "size": size, "ms_best": round(1e3 * best, 3),
                     "tflops": round(2 * tokens * dim * 3 * dim / best / 1e12, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _flash_impls() -> list[str]:
    lister = getattr(torch.nn.attention, "list_flash_attention_impls", None)
    try:
        return list(lister()) if lister is not None else []
    except Exception:  # an older torch without the registry
        return []


def _unavailable(label: str, size: str, why: str) -> dict:
    row = {"kernel": label, "size": size, "available": False, "why": why}
    print(json.dumps(row), flush=True)
    return row


def print_tables(results: list[dict], kernels: list[dict]) -> None:
    print(f"\n{'variant':<18}{'size':<7}{'best s':>9}{'TFLOP/s':>9}{'% 790':>7}{'peak GiB':>10}{'1st call s':>11}"
          f"  rel-L2 vs plain")  # fmt: skip
    for r in results:
        print(f"{r['variant']:<18}{r['size']:<7}{r['seconds_best']:>9}{r['tflops']:>9}{r['pct_of_790']:>7}"
              f"{r['peak_gib'] or '-':>10}{r['first_call_s']:>11}  {r['rel_l2_vs_first']:.2e}")  # fmt: skip
    for size, target in TARGETS_S.items():
        runs = [r for r in results if r["size"] == size]
        if runs:
            best = min(runs, key=lambda r: r["seconds_best"])
            peak_ok = best["peak_gib"] is None or best["peak_gib"] <= TARGET_PEAK_GIB
            verdict = "met" if best["seconds_best"] <= target and peak_ok else "missed"
            print(f"target {size}: <= {target} s and <= {TARGET_PEAK_GIB} GiB -> best {best['variant']} "
                  f"{best['seconds_best']} s, {best['peak_gib']} GiB: {verdict}")  # fmt: skip
    if kernels:
        print(f"\n{'kernel':<26}{'layout':<15}{'size':<7}{'ms':>10}{'TFLOP/s':>9}")
        for k in kernels:
            if k.get("available") is False:
                print(f"{k['kernel']:<26}{'':<15}{k['size']:<7}  unavailable: {k['why']}")
                continue
            print(f"{k['kernel']:<26}{k.get('layout', ''):<15}{k['size']:<7}{k['ms_best']:>10}{k['tflops']:>9}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, config, sizes = torch.device("cpu"), torch.float32, tiny_config("i2v"), ["tiny"]
    else:
        if not torch.cuda.is_available():
            print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
            return 2
        device, dtype, config = torch.device("cuda"), torch.bfloat16, DiTConfig.real_14b()
        sizes = [s.strip() for s in args.sizes.split(",")]
        attention_mod.set_backend(args.attention)
    start = time.perf_counter()
    model = build(config, device, dtype, seed=0)
    print(json.dumps({"bench": "fast_build", "seconds": round(time.perf_counter() - start, 2),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)  # fmt: skip
    results = measure_variants(model, config, sizes, args, device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    layouts = [name.strip() for name in args.kernel_layouts.split(",")]
    if unknown := [name for name in layouts if name not in LAYOUTS]:
        raise SystemExit(f"--kernel-layouts: {unknown} not in {', '.join(LAYOUTS)}")
    backends = [name.strip() for name in args.kernel_backends.split(",")]
    kernels = [] if args.no_kernels else measure_kernels(config, sizes, device, dtype, backends, layouts)
    if device.type == "cuda":
        attention_mod.set_backend(args.attention)
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
        args.out.write_text(json.dumps({**meta, "results": results, "kernels": kernels}, indent=1))
    print_tables(results, kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
