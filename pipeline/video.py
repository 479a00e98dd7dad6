"""Write generated frames to an H.264 mp4 the way the Wan2.2 reference maps values, and probe mp4s by decoding.

Must not resample, resize or colour-correct frames: the value mapping is the reference's, bit for bit.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

DEFAULT_CRF = 10  # the reference's imageio quality=8 becomes libx264 -crf 10


class VideoError(ValueError):
    """A frame tensor or an mp4 that cannot be written or read, with what was expected."""


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8: clamp, (x+1)/2, x255, truncate (not round)."""
    x = torch.as_tensor(frames).detach().to("cpu", torch.float32)
    if x.dim() != 4 or x.shape[0] != 3:
        raise VideoError(f"frames: got shape {tuple(x.shape)}, expected [3, F, H, W] (RGB in [-1, 1])")
    x = x.clamp(-1.0, 1.0)
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)  # torchvision make_grid(normalize=True, value_range=(-1, 1))
    x = (x * 255).to(torch.uint8)  # .type(uint8) truncates toward zero, as the reference does
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def write_mp4(
    frames: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    fps: float,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Encode frames [3, F, H, W] in [-1, 1] as H.264 yuv420p with +faststart; returns the written path.

    The file appears atomically (written beside it, then renamed) so a reader never sees half an mp4.
    """
    rgb = frames_to_uint8(frames)
    count, height, width, _ = rgb.shape
    _check_writable(count, width, height, fps, crf)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        _encode(rgb, partial, fps, crf)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _check_writable(count: int, width: int, height: int, fps: float, crf: int) -> None:
    if count < 1:
        raise VideoError("frames: got 0 frames, expected at least 1")
    if width % 2 or height % 2:
        raise VideoError(f"frames: got {width}x{height}, expected even width and height (yuv420p)")
    if not fps > 0:
        raise VideoError(f"fps: got {fps!r}, expected a positive number, e.g. 16")
    if not 0 <= crf <= 51:
        raise VideoError(f"crf: got {crf!r}, expected 0..51 (lower is better quality; reference 10)")


def _encode(rgb: np.ndarray, path: Path, fps: float, crf: int) -> None:
    # av picks the muxer from the extension; the partial name ends in ".partial", so name it explicitly.
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = rgb.shape[2], rgb.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for image in rgb:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def read_mp4(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode every frame: ([F, H, W, 3] uint8 RGB, fps)."""
    with _open_for_reading(path) as container:
        stream = container.streams.video[0]
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    if not images:
        raise VideoError(f"{path}: no decodable video frames")
    return np.stack(images), fps


def probe(path: str | os.PathLike[str]) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) of an mp4, counting frames by decoding them (headers can lie)."""
    with _open_for_reading(path) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
    if count == 0:
        raise VideoError(f"{path}: no decodable video frames")
    return count, width, height, fps


def _open_for_reading(path: str | os.PathLike[str]) -> av.container.InputContainer:
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: cannot open as a video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream, expected an H.264 mp4")
    return container
