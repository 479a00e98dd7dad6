"""A throwaway job kind, `echo`: its image, shrunk, held still for `frames` frames. Only for the tests.

It shows what a new kind is: this one entry, its preparation and its pool family, and no edit of wanbox.
Registered when imported (WANBOX_KINDS=tests.kinds.echo in every process of a daemon that should know it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inbox_schema import Job
from inbox_schema.kinds import InputRole, Kind, register
from pipeline.preprocess.contract import Prepared, PrepSettings, Progress
from pipeline.weights.layouts import Family

ECHO = register(Kind(
    name="echo",
    model_id="echo-1",
    model_folder="Echo-1",
    purpose="hold an image still",
    inputs=(InputRole("still", "image", "still.png"),),
    sizes=("64*64",),
    default_size="64*64",
    default_steps=1,
    default_fps=8,
    default_guide=1.0,
    default_prompt="",
    prepare="tests.kinds.echo:prepare",
    family="tests.kinds.echo:EchoFamily",
    layout="tests.kinds.echo:LAYOUT",
))

LAYOUT = Family(name="echo-1", repo_id="example/echo-1", files=(), dit_dirs=())


def prepare(job: Job, work_dir: Path, settings: PrepSettings, progress: Progress) -> Prepared:
    from PIL import Image

    target = work_dir / "still.png"
    with Image.open(job.inputs["still"].path) as image:
        image.convert("RGB").resize((job.video.width, job.video.height)).save(target)
    progress("shrink", 1, 1)
    return Prepared({"still": str(target)}, {"size": job.video.size})


class EchoFamily:
    """The pool family: no model to load; a job's video is its prepared image, `frames` times."""

    kind = "echo"

    def __init__(self, args: Any, ranks: Any) -> None:
        self.args, self.ranks = args, ranks
        self.parallel = {"world_size": ranks.world_size}
        self.checkpoints: dict[str, str] = {}

    def load(self) -> None:
        pass

    def run(self, job: Job, inputs: dict[str, str], report: Any, should_cancel: Any,
            checkpoint: Any = None) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        pixels = np.asarray(Image.open(inputs["still"]).convert("RGB"), dtype=np.float32) / 127.5 - 1
        frame = torch.from_numpy(pixels).permute(2, 0, 1)  # [3, H, W]
        report.progress("sampling", 1, 1)
        video = frame[:, None].repeat(1, job.video.frames, 1, 1)
        return {"video": video, "fps": float(job.video.fps), "frames": job.video.frames,
                "width": job.video.width, "height": job.video.height, "seed": job.seed}
