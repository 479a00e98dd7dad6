"""Benchmark: one whole I2V-A14B job on a warm pool at the real 14B size, random weights: T5, the image's VAE
encode, the denoising loop with both experts, the VAE decode and the H.264 write, each timed; a preset's job
(e.g. the 4-step distillation schedule, guidance 1) in bf16 and in FP8, and one guided bf16 step for the
40-step baseline of the same run.

Runs the pool's own calls (pipeline.i2v.prepare_i2v, sample_i2v; pipeline.families.i2v.decode_checked into
pipeline.video.VideoOutput, so the mp4 encodes while the VAE decodes, at the daemon's default crf; the fast path
and pipeline.models.fp8) on random weights built on the GPU (no checkpoint, no download). The first job of each
precision compiles (reported apart); the second is the warm job. After it, the same latent is decoded and
written both ways: whole, then written (the worker before streaming), and streamed as the pool does it now.
Prints one JSON line on stdout.

    python bench/bench_job.py --size 720p                # ~5 min on one H200
    python bench/bench_job.py --size 480p --precisions fp8
    python bench/bench_job.py --tiny                     # CPU smoke test of the same steps
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import build, tiny_config  # noqa: E402
from bench.bench_fast import sync  # noqa: E402
from bench.bench_vae import build_vae  # noqa: E402
from daemon.config import OutboxSettings  # noqa: E402
from pipeline.families.i2v import decode_checked  # noqa: E402
from pipeline.i2v import I2VModels, decode_video, prepare_i2v, sample_i2v  # noqa: E402
from pipeline.models import attention as attention_mod  # noqa: E402
from pipeline.models import fp8  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402
from pipeline.models.fast import optimize  # noqa: E402
from pipeline.models.t5 import T5Config, T5Encoder  # noqa: E402
from pipeline.sampling import make_solver  # noqa: E402
from pipeline.sampling.moe import ExpertSwitch  # noqa: E402
from pipeline.video import VideoOutput, write_mp4  # noqa: E402

SIZES = {"720p": (1280, 720), "480p": (832, 480), "tiny": (64, 48)}
# lightx2v's Wan2.2-Lightning I2V schedule: Euler over these timesteps with shift 5, guidance 1, the
# high-noise expert for the first two steps (boundary 0.9 of the shifted schedule), as LightX2V runs it.
LIGHTNING = {"steps": 4, "solver": "euler", "shift": 5.0, "timesteps": (1000, 750, 500, 250), "guide": 1.0,
             "boundary": 0.9}
TEXT_TOKENS = 512  # T5's padded length (the reference's text_len)
CRF = OutboxSettings().crf  # what a delivered mp4 gets by default ([outbox] crf)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="720p")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--fp8-attention", action="store_true",
                   help="with fp8: let the attention picker use an 8-bit kernel (lossy; the worker's --fp8-attention)")
    p.add_argument("--baseline-step", action="store_true", default=True,
                   help="also one guided (scale 3.5) UniPC step in bf16: the 40-step job's per-step cost")
    p.add_argument("--no-baseline-step", dest="baseline_step", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (no compile)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def say(*parts: Any) -> None:
    print("bench_job:", *parts, file=sys.stderr, flush=True)


class Phases:
    """Wall time per phase, with the device synchronised at each boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._last = device, {}, time.perf_counter()

    def mark(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times[name] = round(self.times.get(name, 0.0) + now - self._last, 3)
        self._last = now


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[I2VModels, T5Encoder]:
    config = tiny_config("i2v") if args.tiny else DiTConfig.real_14b()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    high, low = (optimize(build(config, device, dtype, args.seed + i), compile=not args.tiny) for i in (0, 1))
    with torch.device("meta"):
        t5 = T5Encoder(T5Config(256, config.text_dim, 32, 64, 4, 2) if args.tiny else T5Config())
    t5 = t5.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    with torch.no_grad():
        for p in t5.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm scales
            else:
                p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
    vae = build_vae(12 if args.tiny else 96, torch.float32, device.type, args.seed)
    return I2VModels(high, low, vae, None, device, dtype), t5.eval()


def one_job(models: I2VModels, t5: T5Encoder, args: argparse.Namespace, schedule: dict[str, Any],
            out: Path) -> dict[str, Any]:  # fmt: skip
    """The pool's job: T5, VAE encode, sampling, decode, write; phase times and the sampling steps."""
    device = models.device
    width, height = SIZES["tiny" if args.tiny else args.size]
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy()
    ids = torch.randint(0, t5.config.vocab_size, (2, TEXT_TOKENS if not args.tiny else 16), device=device)
    phases = Phases(device)
    with torch.no_grad():
        text = t5(ids, torch.ones_like(ids))
        context, context_null = text[0].to(models.dtype), text[1].to(models.dtype)
        phases.mark("t5")
        inputs = prepare_i2v(models, image, context, context_null, max_area=width * height, frames=args.frames,
                             seed=args.seed)
        phases.mark("vae_encode")
        solver = make_solver(schedule["solver"], schedule["steps"], schedule["shift"], schedule.get("timesteps"))
        switch = ExpertSwitch(boundary=schedule["boundary"], guide_scale=(schedule["guide"], schedule["guide"]))
        latent = sample_i2v(models, inputs, solver, switch)
        phases.mark("sampling")
    frames = decode_streamed(models, latent, out, phases, "vae_decode")
    total = round(sum(phases.times.values()), 3)
    return {"phases": phases.times, "total_s": total, "steps": solver.num_steps,
            "finite": bool(torch.isfinite(latent).all()), "frames": frames, "latent": latent}


def decode_streamed(models: I2VModels, latent: torch.Tensor, out: Path, phases: Phases, decode_phase: str) -> int:
    """The pool's decode, streamed into the mp4, then the encoder's tail ("write"); the frames written. The
    encoder runs during the decode phase, so that phase holds all of the encoding but its last frames."""
    video = VideoOutput(out, CRF)
    writer = video.open(16.0)
    decode_checked(models.vae, latent, Quiet(), writer)
    phases.mark(decode_phase)
    video.finish(None, 16.0)
    phases.mark("write")
    return writer.frames


class Quiet:
    def progress(self, phase: str, step: int = 0, total: int = 0) -> None:
        pass


def decode_and_write(models: I2VModels, latent: torch.Tensor, out: Path) -> dict[str, Any]:
    """The same latent decoded and written both ways, in seconds: whole, then written (the worker before
    streaming), and streamed into the encoder as the pool does it now."""
    device, times = models.device, {}
    phases = Phases(device)
    video = decode_video(models, latent)
    phases.mark("decode")
    write_mp4(video, out, fps=16, crf=CRF)
    phases.mark("write")
    del video
    times["whole_then_write"] = {**phases.times, "total": round(sum(phases.times.values()), 3)}
    phases = Phases(device)
    decode_streamed(models, latent, out, phases, "decode")
    times["streamed"] = {**phases.times, "total": round(sum(phases.times.values()), 3)}
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.tiny else "cuda")
    cuda = device.type == "cuda"
    started = time.perf_counter()
    models, t5 = build_models(args, device)
    say("built in", round(time.perf_counter() - started, 1), "s")
    result: dict[str, Any] = {"bench": "job", "size": args.size, "frames": args.frames, "preset": LIGHTNING,
                              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    out = Path(tempfile.mkdtemp(prefix="bench-job-")) / "job.mp4"
    for precision in [p.strip() for p in args.precisions.split(",")]:
        if precision == "fp8":
            for expert in (models.high_noise, models.low_noise):
                fp8.apply_precision(expert, "fp8", device=device)
            attention_mod.allow_fp8(args.fp8_attention)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first = one_job(models, t5, args, LIGHTNING, out)  # compiles at this size
        first.pop("latent")
        say(precision, "first job", first)
        warm = one_job(models, t5, args, LIGHTNING, out)
        latent = warm.pop("latent")
        say(precision, "warm job", warm)
        row = {"first_job": first, "warm_job": warm, "attention": attention_mod.active_backend(),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        row["decode_and_write"] = decode_and_write(models, latent, out)
        say(precision, "decode and write", row["decode_and_write"])
        if precision == "bf16" and args.baseline_step:
            guided = {"steps": 1, "solver": "unipc", "shift": 5.0, "guide": 3.5, "boundary": 0.9}
            step = one_job(models, t5, args, guided, out)["phases"]["sampling"]  # its latent: noise, unused
            row["guided_step_s"] = step
            fixed = sum(v for k, v in warm["phases"].items() if k != "sampling")
            row["job_40_steps_estimate_s"] = round(40 * step + fixed, 1)
        result[precision] = row
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench_job: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
        return 2
    if args.tiny:
        args.frames = min(args.frames, 5)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
