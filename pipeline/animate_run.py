"""`python -m pipeline.animate_run CKPT_DIR SRC_DIR OUT.mp4 --mode animation|replacement [...]`: one Animate job
in one process, outside the daemon (checks on real weights, GPU smoke runs).

Must not replace the warm pool: no ledger, no socket, no multi-GPU; it loads the models, runs
generate_animate on a preprocessed src folder and writes the mp4 at the reference's 30 fps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.animate_run", description=__doc__.splitlines()[0])
    p.add_argument("ckpt_dir", type=Path, help="Wan2.2-Animate-14B checkpoint directory")
    p.add_argument("src_dir", type=Path, help="animate preprocessing output (src_pose.mp4, src_face.mp4, ...)")
    p.add_argument("out", type=Path, help="mp4 to write")
    p.add_argument("--mode", choices=("animation", "replacement"), required=True)
    p.add_argument("--clip-len", type=int, default=77)
    p.add_argument("--refert-num", type=int, default=1, choices=(1, 5))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--guide-scale", type=float, default=1.0)
    p.add_argument("--solver", default="unipc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="default: the reference's fixed Animate prompt")
    p.add_argument("--relighting-lora", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, else fp32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipeline.animate import FPS, AnimateModels, generate_animate
    from pipeline.video import write_mp4

    args = parse_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    start = time.perf_counter()
    models = AnimateModels.load(args.ckpt_dir, args.device, dtype, relighting_lora=args.relighting_lora)
    loaded = time.perf_counter()

    def progress(phase: str, step: int, total: int, clip: int) -> None:
        print(f"{phase} {step}/{total} (clip {clip + 1})", file=sys.stderr, flush=True)

    try:
        video = generate_animate(models, args.src_dir, mode=args.mode, prompt=args.prompt, clip_len=args.clip_len,
                                 refert_num=args.refert_num, steps=args.steps, shift=args.shift,
                                 guide_scale=args.guide_scale, solver=args.solver, seed=args.seed,
                                 relighting_lora=args.relighting_lora, on_progress=progress)
    except ValueError as exc:  # bad parameters or src files: the message says which and what to do
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = time.perf_counter()
    write_mp4(video, args.out, FPS)
    print(json.dumps({"out": str(args.out), "frames": int(video.shape[1]), "height": int(video.shape[2]),
                      "width": int(video.shape[3]), "fps": FPS, "load_s": round(loaded - start, 2),
                      "generate_s": round(done - loaded, 2), "device": args.device, "dtype": dtype_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
