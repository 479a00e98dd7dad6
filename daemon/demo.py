"""`wanbox demo`: the first thing a new user runs — one real job through the whole daemon on a tiny model.

Makes a tiny random I2V checkpoint (cached), a throwaway root, a CPU worker pool, and submits an example
job built from a real photo; it must not touch any existing wanbox root, ledger or model directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from daemon.config import Config, parse_config

# NOTICE: demo_cat.jpg is a downscaled copy of examples/i2v_input.jpg from the public Wan2.2 repository
# (Apache License 2.0); see pipeline/assets/NOTICE.
PHOTO = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "demo_cat.jpg"
JOB_NAME = "demo-surfing-cat"
# The tiny model is noise: keep the job small so a CPU finishes in about a minute. The size string is a
# real one (the manifest rules hold); the worker caps the area for the tiny model.
DEMO_MAX_AREA = 128 * 160
MANIFEST = """\
# Written by `wanbox demo`: the same manifest a user drops into the inbox (media first, manifest last).
schema = 1
kind = "i2v"
prompt = "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard."

[inputs]
image = "cat.jpg"

[video]
size = "832*480"
frames = {frames}
fps = 16

[sampling]
steps = {steps}
seed = 42
"""
END_STATES = ("done", "failed", "rejected", "cancelled")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wanbox demo", description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "wanbox",
                   help="where the tiny demo model is kept between runs (default ~/.cache/wanbox)")
    p.add_argument("--root", type=Path, default=None, help="use this (new or empty) root instead of a temp dir")
    p.add_argument("--nproc", type=int, default=1, choices=(1, 2), help="CPU worker processes (gloo)")
    p.add_argument("--frames", type=int, default=17, help="frames of the demo video (4n+1)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    return p.parse_args(argv)


def ensure_tiny_model(cache_dir: Path) -> Path:
    """The tiny I2V checkpoint in the cache, written once (by the same tool the tests use)."""
    ckpt = cache_dir / "demo-tiny-i2v"
    if (ckpt / "high_noise_model" / "config.json").is_file() and (ckpt / "Wan2.1_VAE.pth").is_file():
        return ckpt
    print(f"wanbox demo: writing a tiny random I2V model to {ckpt} (once)")
    partial = cache_dir / "demo-tiny-i2v.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pipeline.weights.tiny", str(partial), "--family", "i2v"],
                   check=True, cwd=PHOTO.parents[2], capture_output=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    partial.rename(ckpt)
    return ckpt


def demo_config(root: Path, ckpt: Path, nproc: int) -> Config:
    """A config for a throwaway root: fast inbox settling, a CPU pool on the tiny model."""
    return parse_config({
        "inbox": {"settle_seconds": 0.5, "rescan_seconds": 1.0},
        "jobs": {"tick_seconds": 0.2, "max_attempts": 1},
        "pool": {"nproc": nproc, "device": "cpu", "max_area": DEMO_MAX_AREA, "threads": 1,
                 "checkpoint_dirs": {"i2v-A14B": str(ckpt)}, "load_deadline_seconds": 300.0,
                 "heartbeat_seconds": 120.0, "stop_grace_seconds": 30.0},
        "preprocess": {"workers": 1},
    }, None, root)


def submit_example(inbox: Path, frames: int, steps: int) -> Path:
    """A folder job: the photo first, the manifest last (the manifest is the commit marker)."""
    folder = inbox / JOB_NAME
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PHOTO, folder / "cat.jpg")
    manifest = folder / "job.toml"
    partial = folder / ".job.toml.tmp"  # a dotfile: the watcher ignores it until the rename
    partial.write_text(MANIFEST.format(frames=frames, steps=steps), encoding="utf-8")
    partial.rename(manifest)
    return manifest


def describe(job: Any) -> str:
    progress = f" {job.phase} {job.step}/{job.total_steps}" if job.phase and job.total_steps else ""
    return f"{job.state}{progress}"


def wait_for_job(supervisor: Any, timeout: float) -> Any | None:
    """Run the supervisor loop here until the demo job ends; prints each change of state or step."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        supervisor.tick()
        jobs = supervisor.ledger.list(limit=1)
        if not jobs:
            continue
        job, now = jobs[0], describe(jobs[0])
        if now != last:
            print(f"wanbox demo: {job.name} {now}", flush=True)
            last = now
        if str(job.state) in END_STATES:
            return job
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from daemon.supervisor import Supervisor

    started = time.monotonic()
    ckpt = ensure_tiny_model(args.cache_dir)
    root = args.root or Path(tempfile.mkdtemp(prefix="wanbox-demo-"))
    config = demo_config(root.resolve(), ckpt, args.nproc)
    print(f"wanbox demo: throwaway root {config.paths.root}")
    supervisor = Supervisor(config)
    supervisor.start()
    try:
        submit_example(config.paths.inbox, args.frames, args.steps)
        job = wait_for_job(supervisor, args.timeout)
    finally:
        supervisor.shutdown()
    code = report(job, config, time.monotonic() - started, args.timeout)
    # Kept on purpose: the output, its sidecar, the ledger and failed/ are what the user came to see.
    print(f"wanbox demo: look around {config.paths.root} (inbox, outbox, failed, state/wanbox.db); "
          f"`rm -rf {config.paths.root}` when done")
    return code


def report(job: Any, config: Config, seconds: float, timeout: float) -> int:
    if job is None:
        print(f"wanbox demo: the job did not finish within {timeout:g} s; see {config.paths.root}", file=sys.stderr)
        return 1
    if str(job.state) != "done":
        print(f"wanbox demo: the job ended {job.state}: {job.last_error}", file=sys.stderr)
        return 1
    videos = sorted(config.paths.outbox.glob("*.mp4"))
    print(f"wanbox demo: done in {seconds:.0f} s (the tiny model is random: expect coloured noise, not a cat)")
    for video in videos:
        print(f"wanbox demo: output {video}")
        sidecar = video.with_suffix(".json")
        if sidecar.is_file():
            shape = json.loads(sidecar.read_text(encoding="utf-8")).get("video", {})
            print(f"wanbox demo: sidecar {sidecar} ({shape.get('frames')} frames, "
                  f"{shape.get('width')}x{shape.get('height')}, {shape.get('fps')} fps)")
    return 0 if videos else 1
