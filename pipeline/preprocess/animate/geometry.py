"""Sizes, letterboxing, frame sampling and face boxes exactly as the Wan2.2 Animate preprocessing computes them.

Pure numpy/OpenCV arithmetic; nothing here runs a model or touches files.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

DIVISOR = 16  # the reference passes divisor=16 to resize_by_area
FACE_CROP_SIZE = 512  # the motion encoder requires 512x512 face crops
FACE_AREA_SCALE = 1.3


def size_by_area(width: int, height: int, area: int, divisor: int = DIVISOR) -> tuple[int, int]:
    """(new_w, new_h) of the reference's resize_by_area: its search helper always raises, so this floor-to-16
    fallback is what runs (new_h = sqrt(area / ar), new_w = area / new_h, each floored to the divisor)."""
    aspect = width / height
    new_h = math.sqrt(area / aspect)
    new_w = area / new_h
    return int((new_w // divisor) * divisor), int((new_h // divisor) * divisor)


def padding_resize(image: np.ndarray, height: int, width: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Letterbox `image` into (height, width) with black bars, keeping its aspect ratio (reference padding_resize)."""
    src_h, src_w = image.shape[:2]
    canvas = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    if src_h / src_w > height / width:
        new_w = int(height / src_h * src_w)
        pad = int((width - new_w) / 2)
        canvas[:, pad : pad + new_w] = _resized(image, new_w, height, interpolation)
    else:
        new_h = int(width / src_w * src_h)
        pad = int((height - new_h) / 2)
        canvas[pad : pad + new_h, :] = _resized(image, width, new_h, interpolation)
    return canvas


def _resized(image: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    out = cv2.resize(image, (width, height), interpolation=interpolation)
    return out[:, :, None] if out.ndim == 2 else out


def resize_by_area(image: np.ndarray, area: int, divisor: int = DIVISOR) -> np.ndarray:
    """The reference's resize_by_area: the size from size_by_area, then fit_to_size."""
    height, width = image.shape[:2]
    new_w, new_h = size_by_area(width, height, area, divisor)
    return fit_to_size(image, new_w, new_h)


def fit_to_size(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Letterbox into (height, width) with INTER_AREA when shrinking, INTER_LINEAR otherwise (as resize_by_area)."""
    src_h, src_w = image.shape[:2]
    interpolation = cv2.INTER_AREA if width * height < src_w * src_h else cv2.INTER_LINEAR
    return padding_resize(image, height, width, interpolation)


def target_frame_count(source_frames: int, source_fps: float, fps: float) -> int:
    """Number of output frames: int(n / fps_src * fps), as the reference computes it."""
    return int(source_frames / source_fps * fps)


def sample_indices(source_frames: int, source_fps: float, fps: float) -> list[int]:
    """Source frame index for each output frame: round(i / fps * fps_src), clipped to the video."""
    count = target_frame_count(source_frames, source_fps, fps)
    times = np.arange(0, count) / fps
    indices = np.clip(np.round(times * source_fps).astype(int), 0, source_frames - 1)
    return [int(i) for i in indices]


def face_crop_box(points: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """(x1, x2, y1, y2) of the reference's get_face_bboxes on 68 face points in pixels: the area grows 1.3x and
    the box extends three times more upwards than downwards; confidences are ignored."""
    min_x, min_y = points.min(axis=0)
    max_x, max_y = points.max(axis=0)
    face_w = max(float(max_x - min_x), 1.0)  # a degenerate (flat) face would divide by zero below
    face_h = max(float(max_y - min_y), 1.0)
    grown_area = face_w * face_h * FACE_AREA_SCALE
    delta_w = (math.sqrt(grown_area * face_w / face_h) - face_w) / 2
    delta_h = (math.sqrt(grown_area * face_h / face_w) - face_h) / 4
    x1 = max(min_x - delta_w, 0)
    x2 = min(max_x + delta_w, width)
    y1 = max(min_y - 3 * delta_h, 0)
    y2 = min(max_y + delta_h, height)
    return int(x1), int(x2), int(y1), int(y2)


def crop_face(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The 512x512 face crop (bilinear, aspect not preserved); an empty box widens to one pixel instead of failing."""
    height, width = frame.shape[:2]
    x1, x2, y1, y2 = box
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    return cv2.resize(frame[y1:y2, x1:x2], (FACE_CROP_SIZE, FACE_CROP_SIZE))
