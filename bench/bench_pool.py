"""Benchmark: the warm pool's parallel I2V sampling at 14B size — 1/2/4(/8) GPUs, Ulysses and CFG-parallel.

Runs the pool's own code path (pipeline.i2v.sample_i2v with pipeline.parallel's Ulysses / CFG-parallel
objects, plan_parallel's checks) on random bf16 weights built from the real 14B config (no checkpoint, no
download; one random expert serves both noise levels) at 480p or 720p, 81 frames: seconds per denoising step, scaling
efficiency, peak memory per GPU and the difference of the final latent vs 1 GPU; with --decode also the VAE
decode (one rank vs the pool's pipelined decode, same latent). Writes a JSON file and prints a table. Must not
load real weights. `--tiny` runs the same thing on the CPU with gloo (smoke test).

    python bench/bench_pool.py --worlds 1,2,4 --decode --out bench/pool.json     # on a 4-GPU host
    python bench/bench_pool.py --tiny --worlds 1,2                      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from pipeline.models.dit import DiTConfig, WanDiT  # noqa: E402

LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # 81 frames at 832x480 / 1280x720: latent [T, h, w]
LATENT_TINY = (3, 6, 10)
NCCL_SAFETY = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_NVLS_ENABLE": "0",
               "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,4", help="GPU counts to run, comma-separated (1 is the baseline)")
    p.add_argument("--modes", default="ulysses,cfg", help="parallel modes for world sizes > 1")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (the first one is warm-up)")
    p.add_argument("--guide-scale", type=float, default=3.5, help="CFG scale (> 1: two forwards per step)")
    p.add_argument("--decode", action="store_true",
                   help="also time the VAE decode (random real-size VAE): one rank vs pipelined over the ranks")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (gloo, fp32): a smoke test")
    p.add_argument("--size", choices=sorted(LATENTS), default="480p", help="81-frame latent shape")
    p.add_argument("--compile", action="store_true",
                   help="apply the worker's fast path (pipeline.models.fast.optimize: fused q/k/v + regional "
                        "compile); the warm-up step then includes compilation")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one run under torchrun
    return p.parse_args(argv)


# --- one configuration, inside torchrun ------------------------------------------------------------


def tiny_config() -> DiTConfig:
    return DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_len=16)


def build_expert(config: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int) -> WanDiT:
    """Meta-device model, allocated on `device` in `dtype`, filled in place with seeded values of sane scale.

    Every rank draws the same values (same seed, same generator type), as if it had loaded one checkpoint.
    """
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            elif "modulation" in name:
                p.normal_(0, 1 / math.sqrt(config.dim), generator=gen)
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
    return model.eval().requires_grad_(False)


def child(args: argparse.Namespace) -> None:
    """One measurement: sample `steps` steps with the chosen layout; rank 0 writes timings and the latent."""
    from pipeline.families.base import parallel_groups
    from pipeline.i2v import I2VInputs, I2VModels, sample_i2v, sequence_length
    from pipeline.parallel.cfg import plan_parallel
    from pipeline.sampling import make_solver
    from pipeline.sampling.moe import ExpertSwitch

    mode, out = args.child.split(":", 1)
    cuda = not args.tiny
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    config = tiny_config() if args.tiny else DiTConfig.real_14b()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    plan = plan_parallel(world, config.num_heads, cfg_parallel=mode == "cfg")
    sp, guidance = parallel_groups(plan)

    expert = build_expert(config, device, dtype, seed=1234)
    if args.compile:
        from pipeline.models.fast import optimize

        optimize(expert, compile=True)
    models = I2VModels(expert, expert, vae=None, text_encoder=None, device=device, dtype=dtype)
    t, h, w = LATENT_TINY if args.tiny else LATENTS[args.size]
    gen = torch.Generator(device=device).manual_seed(42)
    y = torch.cat([torch.zeros(4, t, h, w, device=device),
                   torch.randn(16, t, h, w, device=device, generator=gen)])
    y[:4, 0] = 1
    noise = torch.randn(16, t, h, w, device=device, generator=gen)
    # prompt lengths of a typical prompt and the default negative prompt, in tokens
    context = torch.randn(min(100, config.text_len - 5), config.text_dim, device=device, generator=gen)
    context_null = torch.randn(min(120, config.text_len), config.text_dim, device=device, generator=gen)
    inputs = I2VInputs(y, noise, context, context_null, sequence_length(t, h, w, sp), w * 8, h * 8, 4 * t - 3)

    stamps = [time.perf_counter()]

    def on_step(_phase: str, _step: int, _total: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    solver = make_solver("unipc", args.steps, 5.0)
    latent = sample_i2v(models, inputs, solver, ExpertSwitch(0.9, args.guide_scale), guidance=guidance, sp=sp,
                        on_progress=on_step)
    decoded = time_decode(noise, device, args) if args.decode else None
    peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], dtype=torch.int64, device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        torch.save(latent.float().cpu(), out + ".pt")
        if decoded is not None:
            torch.save(decoded[1].cpu(), out + ".video.pt")
        Path(out + ".json").write_text(json.dumps({
            "world_size": world, "mode": mode, **plan.as_dict(), "step_seconds": steps,
            **({"decode_seconds": decoded[0]} if decoded is not None else {}),
            "peak_memory": [int(p.item()) for p in peaks], "tokens": t * h * w // 4,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }))
    dist.destroy_process_group()


def time_decode(latent: torch.Tensor, device: torch.device, args: argparse.Namespace):  # noqa: ANN201
    """Seconds to decode `latent` (the same on every configuration: the start noise), and the video.

    One rank decodes alone (vae.decode); several run the pipelined decode of the pool. The VAE has the
    real architecture (tiny widths with --tiny) and random weights, identical on every rank (same seed).
    """
    from pipeline.models.vae import VaeConfig, VideoVAE, WanVAE
    from pipeline.parallel.vae_decode import decode_pipelined

    torch.manual_seed(7)
    vae = WanVAE(VideoVAE(VaeConfig(dim=8 if args.tiny else 96)), device=device)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    video = vae.decode(latent) if dist.get_world_size() == 1 else decode_pipelined(vae, latent)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, video


# --- the driver: every configuration as its own torchrun, then the table ------------------------------


def configurations(args: argparse.Namespace) -> list[tuple[int, str]]:
    worlds = [int(w) for w in args.worlds.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    available = os.cpu_count() if args.tiny else torch.cuda.device_count()
    runs = [(1, "single")]
    for world in worlds:
        if world == 1:
            continue
        if world > max(1, available or 1) and not args.tiny:
            print(f"skipping world size {world}: only {available} GPUs here", file=sys.stderr)
            continue
        runs += [(world, mode) for mode in modes]
    return runs


def launch(world: int, mode: str, workdir: Path, args: argparse.Namespace) -> dict | None:
    out = workdir / f"w{world}-{mode}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(Path(__file__).resolve()), "--child", f"{mode}:{out}", "--steps", str(args.steps),
           "--guide-scale", str(args.guide_scale), "--size", args.size, *(["--tiny"] if args.tiny else []),
           *(["--compile"] if args.compile else []),
           *(["--decode"] if args.decode else [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key, value in NCCL_SAFETY.items():
        env.setdefault(key, value)
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(f"world {world} {mode}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(Path(str(out) + ".json").read_text())
    result["latent"] = torch.load(str(out) + ".pt")
    if args.decode:
        result["video"] = torch.load(str(out) + ".video.pt")
    return result


def summarise(results: list[dict]) -> list[dict]:
    """Per-step time (median after the warm-up step), speed-up and efficiency vs 1 GPU, latent difference."""
    base = results[0]
    rows = []
    for r in results:
        steps = r["step_seconds"][1:] or r["step_seconds"]
        r["step_median"] = sorted(steps)[len(steps) // 2]
    for r in results:
        diff = (r["latent"] - base["latent"]).float()
        speedup = base["step_median"] / r["step_median"]
        row = {k: v for k, v in r.items() if k not in ("latent", "video")} | {
            "speedup": round(speedup, 3), "efficiency": round(speedup / r["world_size"], 3),
            "max_abs_diff_vs_1": float(diff.abs().max()),
            "rel_l2_vs_1": float(diff.norm() / base["latent"].float().norm()),
        }
        if "video" in r:  # the same latent decoded: the pipelined decode must be bit-exact
            row["decode_speedup"] = round(base["decode_seconds"] / r["decode_seconds"], 3)
            row["decode_max_abs_diff_vs_1"] = float((r["video"] - base["video"]).abs().max())
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'GPUs':>4} {'mode':8} {'cfg':>3} {'uly':>3} {'s/step':>8} {'speedup':>7} {'eff':>5} "
             f"{'peak GiB/GPU':>14} {'max|diff|':>10} {'rel-L2':>9}"]
    for r in rows:
        peak = max(r["peak_memory"]) / 2**30
        lines.append(f"{r['world_size']:>4} {r['mode']:8} {r['cfg']:>3} {r['ulysses']:>3} {r['step_median']:>8.3f} "
                     f"{r['speedup']:>7.2f} {r['efficiency']:>5.2f} {peak:>14.1f} "
                     f"{r['max_abs_diff_vs_1']:>10.2e} {r['rel_l2_vs_1']:>9.2e}"
                     + (f"  decode {r['decode_seconds']:.2f} s (x{r['decode_speedup']:.2f}, "
                        f"max|diff| {r['decode_max_abs_diff_vs_1']:.1e})" if "decode_seconds" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        results = [r for world, mode in configurations(args)
                   if (r := launch(world, mode, Path(tmp), args)) is not None]
    if not results or results[0]["world_size"] != 1:
        print("the 1-GPU baseline failed; nothing to compare", file=sys.stderr)
        return 1
    rows = summarise(results)
    print(table(rows))
    report = {"what": "I2V sampling steps, random bf16 14B weights (one expert for both noise levels), "
                      f"{args.size} 81 frames" if not args.tiny else "tiny CPU smoke test",
              "steps": args.steps, "guide_scale": args.guide_scale, "runs": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0 if len(rows) == len(configurations(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
