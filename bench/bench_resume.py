"""Benchmark: sampling checkpoints at the real 14B I2V size (random bf16 weights, one H200, 480p): the time
of a checkpoint write and of a resume, the file's size, the NaN/Inf watch's cost per step, and the time a
resume at step k of N saves; `--tiny` smoke-tests the same code on the CPU. Prints one JSON line.

Must not load or download real weights (bench_dit_forward builds the DiT on the meta device and fills it on
the GPU). Both experts are the same module: the expert switch costs nothing here and changes no timing.

    python bench/bench_resume.py                       # ~2-3 minutes on one H200
    python bench/bench_resume.py --resume-at 30 --of 40 --dir /var/lib/wanbox/work   # the job folder's disk
    python bench/bench_resume.py --tiny                # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_dit_forward import LATENTS, build, tiny_config  # noqa: E402
from pipeline.i2v import I2VInputs, I2VModels, i2v_loop_key, sample_i2v  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402
from pipeline.sampling import make_solver  # noqa: E402
from pipeline.sampling.checkpoint import FILE_NAME, CheckpointPolicy, CheckpointStore, Fingerprint  # noqa: E402
from pipeline.sampling.moe import ExpertSwitch  # noqa: E402
from pipeline.sampling.numerics import FiniteWatch  # noqa: E402


class Interrupted(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--size", default="480p", choices=("480p", "720p"))
    p.add_argument("--steps", type=int, default=4, help="steps actually sampled per run (the timing sample)")
    p.add_argument("--resume-at", type=int, default=30, help="k of the 'resume at step k of N' estimate")
    p.add_argument("--of", type=int, default=40, help="N of that estimate (a 40-step job)")
    p.add_argument("--dir", default=None, help="folder for the checkpoint (default: a temp dir); use the "
                                               "disk that holds the daemon's work/ folder")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def set_up(args: argparse.Namespace) -> tuple[I2VModels, I2VInputs, str]:
    if args.tiny:
        device, dtype, config, grid, size = torch.device("cpu"), torch.float32, tiny_config("i2v"), LATENTS["tiny"], "tiny"
    else:
        device, dtype, config = torch.device("cuda"), torch.bfloat16, DiTConfig.real_14b()
        grid, size = LATENTS[args.size], args.size
    expert = build(config, device, dtype, args.seed)
    models = I2VModels(expert, expert, None, None, device, dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    t, h, w = grid
    inputs = I2VInputs(
        y=torch.randn(config.in_dim - 16, t, h, w, generator=gen, device=device),
        noise=torch.randn(16, t, h, w, generator=gen, device=device),
        context=torch.randn(config.text_len, config.text_dim, generator=gen, device=device),
        context_null=torch.randn(config.text_len, config.text_dim, generator=gen, device=device),
        seq_len=t * h * w // 4, width=w * 8, height=h * 8, frames=4 * (t - 1) + 1,
    )  # fmt: skip
    return models, inputs, size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(models: I2VModels, inputs: I2VInputs, steps: int, **kw: object) -> tuple[torch.Tensor | None, float]:
    sync(models.device)
    start = time.perf_counter()
    try:
        latent = sample_i2v(models, inputs, make_solver("unipc", steps, 5.0), ExpertSwitch(0.9, 3.5), **kw)
    except Interrupted:
        latent = None
    sync(models.device)
    return latent, time.perf_counter() - start


def restore_seconds(models: I2VModels, inputs: I2VInputs, store: CheckpointStore, steps: int) -> float:
    """What a resume costs before its first step: read, verify, load the solver and the latent to the GPU."""
    solver = make_solver("unipc", steps, 5.0)  # the schedule the checkpoint was written under
    sync(models.device)
    start = time.perf_counter()
    state = store.begin(i2v_loop_key(inputs, solver, ExpertSwitch(0.9, 3.5)), solver, models.device)
    assert state is not None, store.ignored
    state.latent.to(models.device)
    sync(models.device)
    return time.perf_counter() - start


def watch_cost(latent: torch.Tensor, repeats: int = 50) -> dict[str, float]:
    """Seconds per step of the NaN/Inf watch: queuing the reduction, and one host sync of its verdict."""
    watch = FiniteWatch(repeats, sync_every=repeats + 1)
    sync(latent.device)
    start = time.perf_counter()
    for i in range(repeats):
        watch.observe(i, latent)
    sync(latent.device)
    queued = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        watch.observe(0, latent)
        watch.finite()
    synced = (time.perf_counter() - start) / repeats
    return {"watch_s_per_step": round(queued, 6), "watch_with_sync_s": round(synced, 6)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: CUDA is required at real size (use --tiny on a CPU)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    models, inputs, size = set_up(args)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-resume-"))
    folder.mkdir(parents=True, exist_ok=True)
    fp = Fingerprint("sha256:bench-job", "sha256:bench-model")
    n, half = args.steps, args.steps // 2

    def store() -> CheckpointStore:
        return CheckpointStore(folder, fp, CheckpointPolicy(every_steps=1, every_seconds=None), log=lambda _l: None)

    timed_run(models, inputs, 1)  # warm-up: kernels, allocator
    whole, whole_s = timed_run(models, inputs, n)
    writer = store()

    def stop(_phase: str, done: int, _total: int) -> None:
        if done == half:
            raise Interrupted

    timed_run(models, inputs, n, checkpoint=writer, on_progress=stop)
    restore_s = restore_seconds(models, inputs, store(), n)
    reader = store()
    resumed, _ = timed_run(models, inputs, n, checkpoint=reader)
    assert whole is not None and resumed is not None and reader.resumed_from is not None
    step_s = whole_s / n
    write_s = (writer.write_seconds + reader.write_seconds) / (writer.writes + reader.writes)
    saved_s = args.resume_at * step_s - restore_s
    diff = (resumed.float() - whole.float()).abs().max().item()
    result = {
        "bench": "resume", "size": size, "latent": list(inputs.noise.shape),
        "device": torch.cuda.get_device_name() if models.device.type == "cuda" else "cpu",
        "dtype": str(models.dtype), "folder_fs": filesystem(folder), "solver": "unipc",
        "step_s": round(step_s, 3), "checkpoint_bytes": (folder / FILE_NAME).stat().st_size,
        "checkpoint_write_s": round(write_s, 4), "restore_s": round(restore_s, 4),
        "write_overhead_at_120s": round(write_s / 120.0, 5), "write_overhead_every_step": round(write_s / step_s, 5),
        **watch_cost(whole),
        "resume_at": args.resume_at, "of": args.of, "saved_s": round(saved_s, 1),
        "saved_fraction": round(saved_s / (args.of * step_s), 3),
        "resumed_max_abs_diff": diff, "resumed_bitwise": bool(torch.equal(resumed, whole)),
        "bench_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    if args.dir is None:
        writer.clear()
        folder.rmdir()
    print(json.dumps(result), flush=True)
    return 0


def filesystem(folder: Path) -> str:
    """The filesystem type holding `folder` (from /proc/mounts: the longest mount point above it)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    path = os.path.realpath(folder)
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=["", "unknown"])
    return best[1]


if __name__ == "__main__":
    sys.exit(main())
