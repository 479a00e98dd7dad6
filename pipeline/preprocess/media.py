"""Whether an input file is usable media of its kind: an image decodes, a video opens and has frames.

For `wanbox validate` (before uploading); it reads the file and must not write anything or import torch.
"""

from __future__ import annotations

from pathlib import Path


def media_problem(path: Path, media: str, shown: str) -> str | None:
    """What is wrong with the image or video at `path` (named `shown` in the message), or None when it is fine."""
    if media == "image":
        from pipeline.preprocess.image import ImageInputError, load_image

        try:
            load_image(path, shown)
        except ImageInputError as exc:
            return str(exc)
        return None
    from pipeline.preprocess.animate.errors import VideoError
    from pipeline.preprocess.animate.video_io import probe_video

    try:
        info = probe_video(path)
    except VideoError as exc:
        return f"video file {shown}: expected {exc.expected}"
    return None if info.frames > 0 else f"video file {shown}: no frames"
