"""Write generated frames to an H.264 mp4 the way the Wan2.2 reference maps values, and probe mp4s by decoding.

Must not resample, resize or colour-correct frames: the value mapping is the reference's, bit for bit.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

DEFAULT_CRF = 10  # the reference's imageio quality=8 becomes libx264 -crf 10


class VideoError(ValueError):
    """A frame tensor or an mp4 that cannot be written or read, with what was expected."""


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8: clamp, (x+1)/2, x255, truncate (not round).

    The arithmetic runs where the frames are (a GPU's elementwise float32 ops round exactly as the CPU's), so
    only a quarter of the bytes cross to the host.
    """
    x = torch.as_tensor(frames).detach()
    if x.dim() != 4 or x.shape[0] != 3:
        raise VideoError(f"frames: got shape {tuple(x.shape)}, expected [3, F, H, W] (RGB in [-1, 1])")
    x = x.to(torch.float32).clamp(-1.0, 1.0)
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)  # torchvision make_grid(normalize=True, value_range=(-1, 1))
    x = (x * 255).to(torch.uint8)  # .type(uint8) truncates toward zero, as the reference does
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class Mp4Writer:
    """An H.264 mp4 (yuv420p, +faststart) encoded while its frames are still being made.

    `add` maps each chunk of frames to uint8 and hands it to an encoder thread, so libx264 works while the VAE
    decodes the next chunk; `close` flushes the encoder and publishes the file atomically (written beside it,
    then renamed: a reader never sees half an mp4); `abort`, or leaving the `with` block by an exception,
    removes what was written. Must not change the frames: those encoded are the ones one call with all of them
    would encode (libx264's bytes may still differ run to run: its threads decide with timing).
    """

    def __init__(self, path: str | os.PathLike[str], fps: float, crf: int = DEFAULT_CRF, backlog: int = 8) -> None:
        _check_rate(fps, crf)
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._chunks: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=backlog)  # bounds host memory
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ended = False  # the encoder thread has taken the last chunk

    def add(self, frames: torch.Tensor | np.ndarray) -> None:
        """Queue frames [3, n, H, W] in [-1, 1] (any device); every chunk of one file has the same size."""
        rgb = frames_to_uint8(frames)
        count, height, width, _ = rgb.shape
        if count == 0:
            return
        if self._size is None:
            _check_size(width, height)
            self._size = (width, height)
            self._thread = threading.Thread(target=self._encode, name=f"mp4 {self.path.name}", daemon=True)
            self._thread.start()
        elif (width, height) != self._size:
            raise VideoError(f"frames: got {width}x{height}, expected {self._size[0]}x{self._size[1]} like the "
                             f"frames before them")
        self._raise_failure()
        self._chunks.put(rgb)
        self.frames += count

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames added; (0, 0) before the first."""
        return self._size or (0, 0)

    def close(self) -> Path:
        """Flush and publish; the encoder's error (e.g. a full disk) is raised here, with nothing left behind."""
        if self.frames == 0:
            self.abort()
            raise VideoError("frames: got 0 frames, expected at least 1")
        self._stop()
        try:
            self._raise_failure()
            os.replace(self.partial, self.path)
        finally:
            self.partial.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._stop()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _stop(self) -> None:
        if self._thread is not None:
            self._chunks.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _encode(self) -> None:
        try:
            _encode_chunks(self._queued(), self.partial, self.size, self.fps, self.crf)
        except BaseException as exc:  # handed to the caller's thread by add/close
            self._error = exc
            if not self._ended:  # keep taking chunks so that add never blocks for ever
                for _ in self._queued():
                    pass

    def _queued(self) -> Iterator[np.ndarray]:
        while (chunk := self._chunks.get()) is not None:  # None: close/abort said there is no more
            yield chunk
        self._ended = True


class VideoOutput:
    """A job's output mp4 before its fps is known: a family that streams its frames opens it (`open`) while it
    decodes; otherwise `finish` writes the family's whole video. Either way `finish` publishes it, `abort`
    (harmless after `finish`) removes what was written."""

    def __init__(self, path: str | os.PathLike[str], crf: int = DEFAULT_CRF) -> None:
        self.path, self.crf = Path(path), crf
        self.writer: Mp4Writer | None = None

    def open(self, fps: float) -> Mp4Writer:
        if self.writer is not None:
            raise VideoError(f"{self.path}: opened twice (one family call writes one video)")
        self.writer = Mp4Writer(self.path, fps, self.crf)
        return self.writer

    def finish(self, video: torch.Tensor | np.ndarray | None, fps: float) -> Path:
        """Publish the streamed frames, or `video` [3, F, H, W] when nothing was streamed."""
        writer = self.writer
        if writer is None:
            writer = self.open(fps)
            if video is not None:
                writer.add(video)
        return writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def write_mp4(
    frames: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    fps: float,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Encode frames [3, F, H, W] in [-1, 1] as H.264 yuv420p with +faststart; returns the written path.

    The file appears atomically (written beside it, then renamed) so a reader never sees half an mp4.
    """
    with Mp4Writer(path, fps, crf) as writer:
        writer.add(frames)
    return writer.path


def _check_rate(fps: float, crf: int) -> None:
    if not fps > 0:
        raise VideoError(f"fps: got {fps!r}, expected a positive number, e.g. 16")
    if not 0 <= crf <= 51:
        raise VideoError(f"crf: got {crf!r}, expected 0..51 (lower is better quality; reference 10)")


def _check_size(width: int, height: int) -> None:
    if width % 2 or height % 2:
        raise VideoError(f"frames: got {width}x{height}, expected even width and height (yuv420p)")


def _encode_chunks(chunks: Iterator[np.ndarray], path: Path, size: tuple[int, int], fps: float, crf: int) -> None:
    # av picks the muxer from the extension; the partial name ends in ".partial", so name it explicitly.
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for rgb in chunks:
            for image in rgb:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
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
