"""Command line of the standalone animate preprocessing (`wanbox preprocess ...` or `python -m ...animate`).

Parses arguments, runs one job, prints what it wrote and the stats; the work itself lives in job.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PreprocessError
from .job import MODES, preprocess_animate_job
from .models import POSE_VARIANTS

MODELS_DIR_ENV = "WANBOX_MODELS_DIR"  # the daemon's configured models directory, when set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, choices=MODES, help="animate the character, or replace the person")
    parser.add_argument("--video", required=True, type=Path, help="driving video")
    parser.add_argument("--character", required=True, type=Path, help="character (reference) image")
    parser.add_argument("--out", required=True, type=Path, help="output folder for src_*.mp4, src_ref.png, preview")
    parser.add_argument("--resolution-area", nargs=2, type=int, default=[1280, 720], metavar=("W", "H"),
                        help="output area W*H; sides are floored to multiples of 16 (default 1280 720)")  # fmt: skip
    parser.add_argument("--fps", type=float, default=30, help="output frame rate, -1 for the source's (default 30)")
    parser.add_argument("--retarget", action="store_true", help="re-proportion the pose to the character (animation)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help=f"folder with the mediapipe files, or the models folder holding mediapipe/ (default: ${MODELS_DIR_ENV})")  # fmt: skip
    parser.add_argument("--pose-model", choices=POSE_VARIANTS, default="heavy", help="pose model (default heavy)")


def _models_dir(args: argparse.Namespace) -> Path:
    if args.models_dir is not None:
        return args.models_dir
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV])  # find_models also looks in its mediapipe/ folder
    raise PreprocessError("--models-dir", None, f"a folder with the mediapipe model files (or set {MODELS_DIR_ENV})")


def _print_progress(phase: str, done: int, total: int) -> None:
    if done == total or done % 32 == 0:
        print(f"{phase}: {done}/{total} frames", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run one preprocessing job; 0 on success, 2 with a one-line reason on bad input or a failed detector."""
    try:
        stats = preprocess_animate_job(
            args.video, args.character, args.out, mode=args.mode, resolution_area=tuple(args.resolution_area),
            fps=args.fps, retarget=args.retarget, models_dir=_models_dir(args), pose_variant=args.pose_model,
            on_progress=_print_progress,
        )  # fmt: skip
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in stats["files"].items():
        print(f"wrote {name}: {path}")
    summary = {key: value for key, value in stats.items() if key != "files"}
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanbox preprocess", description="Animate-14B preprocessing (mediapipe)")
    add_arguments(parser)
    return run(parser.parse_args(argv))
