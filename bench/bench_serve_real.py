"""Benchmark: a 4-step preset job and a LoRA job end to end through a real `wanbox serve` at the real
I2V-A14B size, with random weights in the released checkpoint layout.

What it does, in order, each step timed:
1. writes a random checkpoint in the released Wan2.2-I2V-A14B layout (`python -m pipeline.weights.tiny
   --real-size --share-experts`: two 14B experts in bf16, 6 shards each, umT5-xxl, the Wan2.1 VAE) into
   `<root>/models/Wan2.2-I2V-A14B`. The low-noise expert's shards are hard links to the high-noise expert's
   (the disk holds one 28.6 GB copy): this run checks the machinery at the real size, not model quality;
   the loader reads the linked folder as a second expert like any other and both sit on the GPU;
2. writes a random rank-16 LoRA of the real model's shapes (original/ComfyUI layout, self-attention q, k, v,
   o of every block, bench_lora.lightning_like) into the LoRA library `<root>/models/loras/`;
3. starts `wanbox serve` on that root (GPU pool, nproc 1, the model preloaded) and waits for the pool;
4. drops a `preset = "lightning-4step"` job, waits for its delivery, then a job with that `[[lora]]`;
5. decodes both mp4s (frame count, size), reads both sidecars (precision, attention kernel, LoRA fields,
   timings, peak memory), samples the GPUs' memory through NVML meanwhile, stops the daemon and prints one
   JSON report (also written to --out).

    python bench/bench_serve_real.py --out serve_real.json    # one H200: 40 GB of disk, ~3 minutes
    python bench/bench_serve_real.py --tiny                   # the same steps on the tiny CPU checkpoint

Exit status 0 only when both jobs were delivered with the frames and size they asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

MODEL = "i2v-A14B"
LORA_NAME = "style/attention_r16.safetensors"
ATTENTION = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
READY = re.compile(r"pool: i2v-A14B ready after ([0-9.]+) s")
HEAD = """schema = 1
kind = "i2v"
prompt = "a lighthouse on a cliff at dusk, waves below"
[inputs]
image = "image.jpg"
[video]
size = "{size}"
frames = {frames}
"""
JOBS = {
    "preset-4step": '[sampling]\npreset = "lightning-4step"\nseed = 1\n',
    "preset-4step-warm": '[sampling]\npreset = "lightning-4step"\nseed = 3\n',  # the same on a compiled pool
    # a few guided steps: the LoRA path is what is checked, not 40-step quality
    "lora-style": f'[sampling]\nsteps = 4\nseed = 2\n[[lora]]\nlibrary = "{LORA_NAME}"\nstrength = 0.8\n',
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny checkpoint, CPU pool (the test's mode)")
    p.add_argument("--size", default="832*480", help="the jobs' [video] size (default 480p)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--rank", type=int, default=16, help="the LoRA's rank")
    p.add_argument("--work", type=Path, default=None, help="the daemon root's parent (default: a new /tmp folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the pool load and for each job")
    p.add_argument("--keep", action="store_true", help="keep the root (checkpoint included) afterwards")
    p.add_argument("--jobs", default="preset-4step,lora-style", help=f"comma list, in order, of {', '.join(JOBS)}")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="[pool] precision (GPU only)")
    args = p.parse_args(argv)
    args.jobs = [name.strip() for name in args.jobs.split(",")]
    unknown = sorted(set(args.jobs) - set(JOBS))
    if unknown:
        p.error(f"--jobs: {', '.join(unknown)} not among {', '.join(JOBS)}")
    return args


def say(*parts: Any) -> None:
    print("bench_serve_real:", *parts, file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------- inputs


def write_checkpoint(ckpt: Path, tiny: bool) -> dict[str, Any]:
    """The released layout through the CLI users run; what was linked, and the bytes on disk."""
    command = [sys.executable, "-m", "pipeline.weights.tiny", str(ckpt), "--family", "i2v", "--share-experts"]
    command += [] if tiny else ["--real-size", "--device", "cuda"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"checkpoint writer failed ({done.returncode}): {done.stderr[-3000:]}")
    shards = sorted((ckpt / "high_noise_model").glob("*.safetensors"))
    linked = all(os.path.samefile(s, ckpt / "low_noise_model" / s.name) for s in shards)
    unique = {p.stat().st_ino: p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    sizes = {rel: (ckpt / rel).stat().st_size for rel in
             ("high_noise_model", "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth")}
    sizes["high_noise_model"] = sum(s.stat().st_size for s in shards)
    return {"write_s": round(seconds, 1), "command": " ".join(command[1:]), "stdout": done.stdout.strip(),
            "bytes_on_disk": sum(unique.values()), "bytes": sizes, "shards_per_expert": len(shards),
            "low_noise_model": "hard links to high_noise_model's shards (same inodes)" if linked else "own files"}


def write_lora(ckpt: Path, library: Path, rank: int) -> dict[str, Any]:
    """A random LoRA of the checkpoint's own shapes (read from its config.json; the model stays on meta)."""
    import torch
    from safetensors.torch import save_file

    from bench.bench_lora import lightning_like
    from pipeline.models.dit import DiTConfig, WanDiT

    started = time.perf_counter()
    with torch.device("meta"):
        model = WanDiT(DiTConfig.from_json(ckpt / "high_noise_model" / "config.json"))
    state = lightning_like(model, rank, seed=5, device=torch.device("cpu"), linears=ATTENTION, full_diffs=())
    path = library / LORA_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return {"file": LORA_NAME, "rank": rank, "targets": list(ATTENTION), "blocks": len(model.blocks),
            "tensors": len(state), "bytes": path.stat().st_size, "write_s": round(time.perf_counter() - started, 2)}


def write_image(path: Path, width: int, height: int) -> None:
    """A smooth synthetic picture (no test media needed)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path, format="JPEG", quality=92)


def write_config(folder: Path, root: Path, tiny: bool, precision: str = "bf16") -> Path:
    socket = Path(tempfile.mkdtemp(prefix="wbx-")) / "pool.sock"  # AF_UNIX paths: at most 107 bytes
    pool = ('device = "cpu"\nmax_area = 4096\nthreads = 2\n' if tiny else
            f'device = "cuda"\nprecision = "{precision}"\n')
    text = (f'[paths]\nroot = "{root}"\nsocket = "{socket}"\n\n'
            '[inbox]\nsettle_seconds = 0.5\nrescan_seconds = 2.0\n\n'
            '[jobs]\nmax_attempts = 1\ntick_seconds = 0.1\n\n'
            f'[pool]\nnproc = 1\npreload = "{MODEL}"\nload_deadline_seconds = 1500\nheartbeat_seconds = 900\n{pool}\n'
            '[preprocess]\nworkers = 1\n')
    config = folder / "config.toml"
    config.write_text(text)
    return config


def drop(inbox: Path, name: str, text: str, size: str) -> None:
    """The folder layout, as a careful uploader does it: the image first, job.toml last (renamed into place)."""
    folder = inbox / name
    folder.mkdir()
    width, height = (int(v) for v in size.split("*"))
    write_image(folder / ".image.jpg.tmp", width, height)
    os.rename(folder / ".image.jpg.tmp", folder / "image.jpg")
    (folder / ".job.toml.tmp").write_text(text)
    os.rename(folder / ".job.toml.tmp", folder / "job.toml")


# ---------------------------------------------------------------------------------------------- watching


class MemoryWatch:
    """Peak used memory per GPU through NVML (daemon.gpus), sampled every 0.2 s in a thread."""

    def __init__(self) -> None:
        from daemon.gpus import GpuProbe

        self.probe, self.peak, self.gpus = GpuProbe(), {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for gpu in self.probe.read():
                index = gpu["index"]
                self.peak[index] = max(self.peak.get(index, 0), gpu["memory_used_bytes"])
                if index >= len(self.gpus):
                    self.gpus.append({"name": gpu["name"], "memory_total_bytes": gpu["memory_total_bytes"]})

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self.probe.close()
        return {"gpus": self.gpus, "peak_used_gib": {i: round(b / 2**30, 2) for i, b in sorted(self.peak.items())}}


def wait_until(check: Any, timeout: float, what: str, daemon: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if daemon.poll() is not None:
            raise RuntimeError(f"wanbox serve exited ({daemon.returncode}) while waiting for {what}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s\n{log.read_text(errors='replace')[-4000:]}")


def outcome(root: Path, name: str) -> dict[str, Any] | None:
    """The delivery (the sidecar is published last) or the failure of a job, once either exists."""
    sidecar = root / "outbox" / f"{name}.json"
    if sidecar.is_file():
        return {"state": "done", "sidecar": json.loads(sidecar.read_text())}
    error = root / "failed" / name / "error.txt"
    if error.is_file():
        return {"state": "failed", "error": error.read_text()}
    return None


def describe(root: Path, name: str, found: dict[str, Any], wall: float, frames: int, size: str) -> dict[str, Any]:
    """What the job asked for against what came out: the decoded video, and the sidecar's facts."""
    from pipeline.video import read_mp4

    row: dict[str, Any] = {"state": found["state"], "wall_s": round(wall, 1)}
    if found["state"] != "done":
        return {**row, "error": found["error"][-2000:]}
    side = found["sidecar"]
    video, fps = read_mp4(root / "outbox" / f"{name}.mp4")
    width, height = (int(v) for v in size.split("*"))
    row["decoded"] = {"frames": int(video.shape[0]), "width": int(video.shape[2]), "height": int(video.shape[1]),
                      "fps": fps, "pixel_mean": round(float(video.mean()), 2), "pixel_std": round(float(video.std()), 2)}
    row["as_asked"] = (row["decoded"]["frames"] == frames and side["video"]["frames"] == frames
                       and row["decoded"]["width"] == side["video"]["width"]
                       and row["decoded"]["height"] == side["video"]["height"])
    row["asked"] = {"frames": frames, "size": size, "area": width * height}
    sampling = side["parameters"]["sampling"]
    row["sampling"] = {k: sampling.get(k) for k in ("preset", "steps", "solver", "shift", "guide_scale",
                                                    "boundary", "timesteps", "seed")}
    for key in ("precision", "attention", "peak_memory", "timings_seconds", "gpu_seconds", "model_load",
                "loras", "lora_switch_seconds", "attempts", "software", "resolution_cap"):
        row[key] = side.get(key)
    row["pool"] = {k: side["pool"].get(k) for k in ("world_size", "devices", "parallel") if k in side["pool"]}
    return row


# ---------------------------------------------------------------------------------------------- the run


def serve_jobs(args: argparse.Namespace, base: Path, report: dict[str, Any]) -> None:
    root = base / "root"
    ckpt = root / "models" / "Wan2.2-I2V-A14B"
    say("writing the checkpoint", "(tiny)" if args.tiny else "(real size, on the GPU)")
    report["checkpoint"] = write_checkpoint(ckpt, args.tiny)
    say("checkpoint", report["checkpoint"])
    report["lora"] = write_lora(ckpt, root / "models" / "loras", args.rank)
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    config = write_config(base, root, args.tiny, args.precision)
    report["config"] = config.read_text()
    log = base / "daemon.log"
    watch = MemoryWatch()
    started = time.monotonic()
    with open(log, "ab") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
                                  cwd=REPO, env=child_env(), stdout=out, stderr=out)
    try:
        ready = wait_until(lambda: READY.search(log.read_text(errors="replace")), args.timeout, "the pool",
                           daemon, log)
        report["pool"] = {"load_s": float(ready.group(1)), "serve_to_ready_s": round(time.monotonic() - started, 1)}
        say("pool", report["pool"])
        report["jobs"] = {}
        for name in args.jobs:
            sampling = JOBS[name]
            dropped = time.monotonic()
            drop(root / "inbox", name, HEAD.format(size=args.size, frames=args.frames) + sampling, args.size)
            found = wait_until(lambda n=name: outcome(root, n), args.timeout, f"job {name}", daemon, log)
            report["jobs"][name] = describe(root, name, found, time.monotonic() - dropped, args.frames, args.size)
            say(name, json.dumps(report["jobs"][name])[:1500])
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            report["daemon_exit"] = daemon.wait(120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            report["daemon_exit"] = "killed after 120 s"
        report["memory"] = watch.stop()
        report["log_tail"] = log.read_text(errors="replace")[-3000:]
        if args.out is not None:  # the whole daemon log beside the report (the root is removed afterwards)
            shutil.copyfile(log, args.out.with_suffix(".daemon.log"))


def _terminated(signum: int, _frame: Any) -> None:
    """SIGTERM (e.g. `timeout`): unwind, so that the daemon is stopped and the partial report written."""
    raise TimeoutError(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("error: CUDA is required at the real size (use --tiny on a CPU)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="wanbox-serve-real-", dir=args.work))
    report: dict[str, Any] = {"bench": "serve_real", "size": args.size, "frames": args.frames,
                              "mode": "tiny" if args.tiny else "real", "torch": torch.__version__,
                              "torch_cuda": torch.version.cuda}  # no CUDA context here: the GPU is the pool's
    try:
        serve_jobs(args, base, report)
    except Exception:  # the report is written whatever failed: it is what the run is for
        report["error"] = traceback.format_exc()[-6000:]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    jobs = report.get("jobs", {})
    report["ok"] = len(jobs) == len(args.jobs) and all(j.get("as_asked") for j in jobs.values())
    text = json.dumps(report, indent=2, default=str)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text, flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
