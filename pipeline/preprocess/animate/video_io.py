"""Driving-video probing/decoding and H.264 mp4 writing with PyAV (FFmpeg in-process).

Frames in and out are RGB uint8 arrays; no detection or drawing here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from .errors import VideoError

QUALITY_CRF = 18  # visually lossless for pose/face/background videos
MASK_CRF = 0  # lossless luma: the generator reads the mask back without thresholding


@dataclass(frozen=True)
class VideoInfo:
    """What probing the driving video found."""

    width: int
    height: int
    fps: float
    frames: int


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise VideoError("video", str(path), "an existing video file")
    if path.stat().st_size == 0:
        raise VideoError("video", str(path), "a non-empty video file (this one has 0 bytes)")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError("video", str(path), f"a readable video file (mp4, mov, mkv, webm…); FFmpeg said: {exc}") from exc


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate and exact frame count: packets are counted (fast, no decoding), since container headers
    can be wrong; frames that then fail to decode are reported by read_frames."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError("video", str(path), "a file with a video stream (this one has none)")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.error.FFmpegError as exc:
            raise VideoError("video", str(path), f"a readable video stream; FFmpeg said: {exc}") from exc
    if frames == 0 or not width or not height:
        raise VideoError("video", str(path), f"at least one video frame (found {frames}, size {width}x{height})")
    if not rate or float(rate) <= 0:
        raise VideoError("video", str(path), "a video with a known frame rate")
    return VideoInfo(width=width, height=height, fps=float(rate), frames=frames)


def read_frames(path: Path, indices: list[int]) -> Iterator[np.ndarray]:
    """Yield the decoded RGB frames at `indices` (non-decreasing; repeats yield the same frame again)."""
    wanted = iter(indices)
    target = next(wanted, None)
    with _open(path) as container:
        try:
            for position, frame in enumerate(container.decode(video=0)):
                if target is None:
                    return
                if position < target:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                while target is not None and target == position:
                    yield rgb
                    target = next(wanted, None)
        except av.error.FFmpegError as exc:
            raise VideoError("video", str(path), f"frame {target} to be decodable; FFmpeg said: {exc}") from exc
    if target is not None:
        raise VideoError("video", str(path), f"frame {target} to be decodable (the video ended before it)")


class VideoWriter:
    """Writes RGB frames to an H.264 yuv420p mp4 at a constant frame rate."""

    def __init__(self, path: Path, fps: float, width: int, height: int, crf: int = QUALITY_CRF) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"{path.name}: yuv420p needs even sizes, got {width}x{height}")
        self.path = path
        self._container = av.open(str(path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self._stream.height, self._stream.width, 3):
            # PyAV would silently rescale a frame of another size; that is always a bug upstream
            raise ValueError(f"{self.path.name}: frame {rgb.shape}, expected {(self._stream.height, self._stream.width, 3)}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a (small) video as RGB arrays; used to check what was written."""
    with _open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
