"""The files an Animate job samples from (src_pose/src_face/src_ref, + src_bg/src_mask), read as the reference reads them.

Must not change pixels beyond what WanAnimate.prepare_source does (decode, BGR->RGB, letterbox the reference,
mask channel 0 kept as 0..255, not re-binarised) and must not touch the models: tensors are built by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inbox_schema.kinds.animate import MODES
from pipeline.video import VideoError, read_mp4

POSE_FILE = "src_pose.mp4"
FACE_FILE = "src_face.mp4"
REFERENCE_FILE = "src_ref.png"
BACKGROUND_FILE = "src_bg.mp4"
MASK_FILE = "src_mask.mp4"
SIZE_MULTIPLE = 16  # the VAE divides by 8, the (1, 2, 2) patch by 2 more


class AnimateInputError(ValueError):
    """A src file is missing, unreadable or inconsistent with the others (names the file, value, expectation)."""


@dataclass
class AnimateSources:
    """Decoded inputs, all with the same frame count: pose [N, H, W, 3], face [N, S, S, 3], reference [H, W, 3]
    (letterboxed to the pose size), and for replacement background [N, H, W, 3] and mask [N, H, W] (0..255)."""

    pose: np.ndarray
    face: np.ndarray
    reference: np.ndarray
    background: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def frames(self) -> int:
        return int(self.pose.shape[0])

    @property
    def height(self) -> int:
        return int(self.pose.shape[1])

    @property
    def width(self) -> int:
        return int(self.pose.shape[2])


def read_sources(src_dir: str | os.PathLike[str], mode: str, face_size: int) -> AnimateSources:
    """Read and check a preprocessing output folder for `mode` ('animation' or 'replacement').

    face_size is the side the model's motion encoder takes (512 for the released model)."""
    if mode not in MODES:
        raise AnimateInputError(f"mode: got {mode!r}, expected one of {', '.join(MODES)}")
    root = Path(src_dir)
    if not root.is_dir():
        raise AnimateInputError(f"{root}: not a folder; expected the animate preprocessing output "
                                f"({POSE_FILE}, {FACE_FILE}, {REFERENCE_FILE})")
    pose = _video(root / POSE_FILE)
    frames, height, width = pose.shape[:3]
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise AnimateInputError(f"{root / POSE_FILE}: frames are {width}x{height}, expected width and height "
                                f"that are multiples of {SIZE_MULTIPLE} (the preprocessing guarantees this)")
    face = _video(root / FACE_FILE)
    _check_frames(root / FACE_FILE, face, frames, (face_size, face_size))
    reference = letterbox(_image(root / REFERENCE_FILE), height, width)
    if mode == "animation":
        return AnimateSources(pose, face, reference)
    background = _video(root / BACKGROUND_FILE)
    _check_frames(root / BACKGROUND_FILE, background, frames, (height, width))
    mask = _video(root / MASK_FILE)
    _check_frames(root / MASK_FILE, mask, frames, (height, width))
    return AnimateSources(pose, face, reference, background, np.ascontiguousarray(mask[..., 0]))


def _video(path: Path) -> np.ndarray:
    if not path.is_file():
        raise AnimateInputError(f"{path}: missing; the animate preprocessing writes it (re-run preprocessing)")
    try:
        frames, _fps = read_mp4(path)  # the fps is never used: frames are consumed one to one
    except VideoError as exc:
        raise AnimateInputError(f"{path}: cannot decode ({exc})") from exc
    return frames


def _image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise AnimateInputError(f"{path}: missing; the animate preprocessing writes the character image there")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise AnimateInputError(f"{path}: not a readable image (expected a PNG of the character)")
    return np.ascontiguousarray(bgr[..., ::-1])


def _check_frames(path: Path, video: np.ndarray, frames: int, size: tuple[int, int]) -> None:
    if video.shape[0] != frames:
        raise AnimateInputError(f"{path}: {video.shape[0]} frames, expected {frames} (one per frame of "
                                f"{POSE_FILE}); re-run preprocessing")
    if tuple(video.shape[1:3]) != size:
        raise AnimateInputError(f"{path}: frames are {video.shape[2]}x{video.shape[1]}, expected "
                                f"{size[1]}x{size[0]}")


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit `image` [h, w, 3] uint8 inside (height, width) keeping its aspect, INTER_LINEAR, centred on black
    (the reference's padding_resize: sizes truncated with int(), the bar offset too)."""
    h0, w0 = image.shape[:2]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if h0 / w0 > height / width:  # taller than the frame: full height, bars left and right
        new_w = max(1, int(height / h0 * w0))
        left = int((width - new_w) / 2)
        canvas[:, left : left + new_w] = cv2.resize(image, (new_w, height), interpolation=cv2.INTER_LINEAR)
    else:
        new_h = max(1, int(width / w0 * h0))
        top = int((height - new_h) / 2)
        canvas[top : top + new_h] = cv2.resize(image, (width, new_h), interpolation=cv2.INTER_LINEAR)
    return canvas


def ping_pong(length: int, target: int) -> list[int]:
    """Frame indices that pad `length` real frames to `target` by reflection: 0, 1, .., n-1, n-2, .., 1, 0, 1, ..
    (end frames not repeated). A single frame is repeated (the reference crashes on it)."""
    if length < 1:
        raise AnimateInputError(f"{POSE_FILE}: 0 frames, expected at least 1")
    if length == 1:
        return [0] * target
    period = 2 * (length - 1)
    return [i % period if i % period < length else period - i % period for i in range(target)]


def padded_length(frames: int, clip_len: int, refert_num: int) -> int:
    """The smallest length >= frames that clips of clip_len overlapping by refert_num cover exactly.

    Equals the reference's get_valid_len whenever frames > refert_num; for fewer frames the reference
    produces no clip at all, here they are padded to one whole clip."""
    stride = clip_len - refert_num
    remainder = (frames - refert_num) % stride
    target = frames if remainder == 0 else frames + stride - remainder
    return max(target, clip_len)


def clip_starts(target: int, clip_len: int, refert_num: int) -> list[int]:
    """First frame of every clip: 0, stride, 2*stride, ... while a clip still adds frames beyond the overlap."""
    return list(range(0, target - refert_num, clip_len - refert_num))
