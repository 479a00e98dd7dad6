"""Benchmark of the animate preprocessing on the CPU: frames per second for animation and replacement mode.

Measures only; it writes its outputs to a temporary folder and prints one Markdown table row per run.
Usage: python bench/bench_preprocess.py --video V --character C --models-dir DIR [--pose-model full] [--fps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.preprocess.animate import preprocess_animate_job  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the detector worker is waited for at job end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_one(args: argparse.Namespace, mode: str, retarget: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="wanbox-bench-") as out:
        cpu_before = cpu_seconds()
        started = time.monotonic()
        stats = preprocess_animate_job(args.video, args.character, Path(out), mode=mode, retarget=retarget,
                                       resolution_area=tuple(args.resolution_area), fps=args.fps,
                                       models_dir=args.models_dir, pose_variant=args.pose_model)  # fmt: skip
        wall = time.monotonic() - started
        cpu = cpu_seconds() - cpu_before
    return {"mode": mode + (" + retarget" if retarget else ""), "frames": stats["frames"],
            "size": f"{stats['width']}x{stats['height']}", "source": f"{stats['source']['width']}x{stats['source']['height']}",
            "wall_s": round(wall, 2), "fps": round(stats["frames"] / wall, 2), "cpu_s": round(cpu, 1), "timings": stats["timings"],
            "frames_without_pose": stats["frames_without_pose"], "frames_without_face": stats["frames_without_face"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--character", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--pose-model", choices=("heavy", "full"), default="full")
    parser.add_argument("--fps", type=float, default=30)
    parser.add_argument("--resolution-area", nargs=2, type=int, default=[1280, 720])
    parser.add_argument("--modes", nargs="+", default=["animation", "replacement"],
                        choices=["animation", "replacement", "retarget"])  # fmt: skip
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average at start {load:.1f}, pose model {args.pose_model}")  # fmt: skip
    print("| mode | frames | output | wall s | frames/s | CPU s | detect s | write s | no pose | no face |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        result = bench_one(args, "animation" if mode == "retarget" else mode, mode == "retarget")
        timings = result["timings"]
        print(f"| {result['mode']} | {result['frames']} | {result['size']} | {result['wall_s']} | {result['fps']} | {result['cpu_s']} | "
              f"{timings['detect_s']} | {timings['write_s']} | {result['frames_without_pose']} | "
              f"{result['frames_without_face']} |", flush=True)  # fmt: skip
        print(json.dumps(result), file=sys.stderr)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
