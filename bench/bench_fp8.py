"""Benchmark: one 14B I2V expert forward in bf16 vs FP8 on the same random weights in the same run (compiled,
best attention kernel, then an 8-bit attention kernel where one passes its self-test), the FP8 output's
rel-L2 against bf16, and the peak memory of an FP8 pool with both experts, T5 and the VAE resident.

Must not load or download real weights (random bf16 weights built on the GPU, as bench_dit_forward does) and
must finish in ~5 minutes on one H200. Progress goes to stderr; the result is one JSON line on stdout.

    python bench/bench_fp8.py                        # 720p and 480p (~4-5 min on one H200)
    python bench/bench_fp8.py --sizes 720p --iters 1 --no-decode
    python bench/bench_fp8.py --tiny                 # CPU smoke test of the same steps (no compile)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, forward_flops, make_inputs, run_once, tiny_config  # noqa: E402
from bench.bench_fast import rel_l2, sync, timed  # noqa: E402
from bench.bench_vae import build_vae  # noqa: E402
from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models import fp8  # noqa: E402
from pipeline.models.dit import DiTConfig, WanDiT  # noqa: E402
from pipeline.models.fast import fused_blocks, optimize  # noqa: E402
from pipeline.models.footprint import GIB, memory_report  # noqa: E402
from pipeline.models.t5 import T5Config, T5Encoder  # noqa: E402

TARGET_720P_S = 7.0  # issue 12: one 720p FP8 forward on one H200 (bf16 + FA3: 10.0 s)
KERNELS = ("fa3", "fa3-fp8", "sage", "cudnn")  # timed alone at the largest size
NO_8BIT = "no 8-bit attention kernel passed its self-test (FA3 built with its FP8 kernels? sageattention?)"
QUERY_SLICE = 256  # queries checked against the float32 math path there (its scores: 256 x L x 40 floats)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="720p,480p")
    p.add_argument("--iters", type=int, default=2, help="timed forwards per variant after one warm-up")
    p.add_argument("--attention", default="auto", help="the bf16 kernel: auto|fa3|cudnn|flash (8-bit ones follow)")
    p.add_argument("--no-fast-accum", action="store_true", help="FP8 GEMMs without cuBLASLt's fast accumulation")
    p.add_argument("--no-decode", action="store_true", help="skip the VAE decode in the pool measurement")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def say(*parts: Any) -> None:
    print("bench_fp8:", *parts, file=sys.stderr, flush=True)


def forward_variant(model: WanDiT, config: DiTConfig, sizes: list[str], args: argparse.Namespace,
                    device: torch.device, baseline: dict[str, torch.Tensor] | None) -> dict[str, dict]:  # fmt: skip
    """Warm-up (compiles) + `iters` timed forwards per size: best seconds, TFLOP/s, peak, rel-L2 vs baseline."""
    rows = {}
    for size in sizes:
        inputs = make_inputs(config, LATENTS[size], device, args.seed)
        times, peak, out = timed(lambda i=inputs: run_once(model, i, device), args.iters, device)
        best, out = min(times[1:]), out.float().cpu()
        rows[size] = {"seconds_best": round(best, 3), "first_call_s": round(times[0], 2),
                      "tflops": round(forward_flops(config, inputs["seq_len"], False) / best / 1e12, 1),
                      "peak_gib": None if peak is None else round(peak, 2), "attention": attention_mod.active_backend(),
                      "finite": bool(torch.isfinite(out).all()), "out": out}  # fmt: skip
        if baseline is not None:
            rows[size]["rel_l2_vs_bf16"] = rel_l2(out, baseline[size])
        say(size, {k: v for k, v in rows[size].items() if k != "out"})
    return rows


def build_pool_parts(config: DiTConfig, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The second expert (FP8, fast path), T5 (allocated in bf16, never run) and the float32 VAE."""
    dtype = torch.float32 if args.tiny else torch.bfloat16
    second = optimize(fp8.apply_precision(build(config, device, dtype, args.seed + 1), "fp8"), compile=not args.tiny)
    t5_config = T5Config(256, 32, 32, 64, 4, 2) if args.tiny else T5Config()
    with torch.device("meta"):
        t5 = T5Encoder(t5_config)
    t5 = t5.to(torch.bfloat16).to_empty(device=device)  # resident like the pool's; values never read
    vae = build_vae(12 if args.tiny else 96, torch.float32, device.type, args.seed)
    return {"expert": second, "t5": t5, "vae": vae}


def measure_pool(experts: list[WanDiT], vae: Any, config: DiTConfig, sizes: list[str], args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Peak memory of one job's work per size with everything resident: a forward of each expert, a decode."""
    cuda = device.type == "cuda"
    resident = torch.cuda.memory_allocated() / GIB if cuda else None
    result: dict[str, Any] = {"resident_gib": None if resident is None else round(resident, 2), "sizes": {}}
    for size in sizes:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        inputs = make_inputs(config, LATENTS[size], device, args.seed)
        row: dict[str, Any] = {}
        for name, expert in zip(("high_noise", "low_noise"), experts, strict=True):
            start = time.perf_counter()
            run_once(expert, inputs, device)
            row[f"{name}_forward_s"] = round(time.perf_counter() - start, 3)
        if not args.no_decode:
            sync(device)
            start = time.perf_counter()
            video = vae.decode(torch.randn_like(inputs["x"]))
            sync(device)
            row.update(decode_s=round(time.perf_counter() - start, 3), video=list(video.shape))
            del video
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None
        result["sizes"][size] = row
        say("pool", size, row)
    return result


def attention_kernels(config: DiTConfig, size: str, device: torch.device) -> dict[str, Any]:
    """Every candidate's self-test and the time of self-attention alone at `size` ([1, L, 40, 128] bf16)."""
    if device.type != "cuda":
        return {}
    t, h, w = LATENTS[size]
    tokens = t * h * w // 4
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, config.num_heads, config.head_dim, device=device, dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))  # fmt: skip
    want = attention_mod.attention_math(q[:, :QUERY_SLICE], k, v).float()  # a slice: the math path is huge
    flops = 4 * tokens * tokens * config.dim
    rows: dict[str, Any] = {}
    for name in KERNELS:  # (the self-test results stay: the picker would run the same tests)
        attention_mod._checked[name] = passed = attention_mod._self_test(name)
        rows[name] = {"self_test": passed}
        if passed:
            times, _, out = timed(lambda n=name: attention_mod._run_cuda(n, q, k, v), 3, device)
            best = min(times[1:])
            rows[name].update(ms=round(1e3 * best, 2), tflops=round(flops / best / 1e12, 1),
                              rel_l2_vs_math=rel_l2(out[:, :QUERY_SLICE], want))  # fmt: skip
        say("attention", name, rows[name])
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.tiny else "cuda")
    config = tiny_config("i2v") if args.tiny else DiTConfig.real_14b()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sizes = ["tiny"] if args.tiny else [s.strip() for s in args.sizes.split(",")]
    fp8.FAST_ACCUM = not args.no_fast_accum
    attention_mod.set_backend(args.attention)
    attention_mod.allow_fp8(False)
    cuda = device.type == "cuda"
    mem = (lambda: torch.cuda.memory_allocated() / GIB) if cuda else (lambda: 0.0)  # noqa: E731

    start = time.perf_counter()
    model = optimize(build(config, device, dtype, args.seed), compile=not args.tiny)
    say("built the bf16 expert in", round(time.perf_counter() - start, 1), "s;", round(mem(), 2), "GiB")
    bf16 = forward_variant(model, config, sizes, args, device, None)
    baseline = {size: row.pop("out") for size, row in bf16.items()}

    before, start = mem(), time.perf_counter()
    fp8.apply_precision(model, "fp8", fp8_attention=False)  # in place: same weights, quantized
    convert_s = round(time.perf_counter() - start, 2)
    expert_gib = {"bf16": round(before, 2), "fp8": round(mem(), 2)}
    say("converted in", convert_s, "s;", expert_gib, "GiB; fused blocks", fused_blocks(model))
    fp8_rows = forward_variant(model, config, sizes, args, device, baseline)

    attention_mod.allow_fp8(True)  # an 8-bit kernel, if one passes its self-test
    eight_bit = attention_mod.active_backend() if cuda else None
    fp8_attn = (forward_variant(model, config, sizes, args, device, baseline)
                if eight_bit in attention_mod.EIGHT_BIT else {})  # fmt: skip

    parts = build_pool_parts(config, device, args)
    pool = measure_pool([model, parts["expert"]], parts["vae"], config, sizes, args, device)
    kernels = attention_kernels(config, max(sizes, key=lambda s: LATENTS[s][1]), device)
    for rows in (fp8_rows, fp8_attn):
        for row in rows.values():
            row.pop("out", None)
    best_720 = min((r["720p"]["seconds_best"] for r in (fp8_rows, fp8_attn) if "720p" in r), default=None)
    return {
        "bench": "fp8", "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "fast_accum": fp8.FAST_ACCUM, "fp8_layers": fp8.fp8_layers(model), "convert_s": convert_s,
        "allocated_gib_with_one_expert": expert_gib, "bf16": bf16, "fp8": fp8_rows,
        "fp8_attention": {"kernel": eight_bit, "sizes": fp8_attn} if fp8_attn else {"kernel": None, "why": NO_8BIT},
        "pool_fp8_both_experts": pool, "attention_kernels": kernels, "describe": fp8.describe(model),
        "target_720p_fp8_s": TARGET_720P_S,
        "target_met": None if best_720 is None else best_720 <= TARGET_720P_S,
        "footprint_estimate": memory_report(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench_fp8: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
        return 2
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
