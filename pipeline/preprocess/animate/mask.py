"""Replacement-mode character masks: person segmentation kept where the pose is, dilated and box-filled (§9.7).

Pure numpy/OpenCV on one frame at a time; it must not run a model.
"""

from __future__ import annotations

import cv2
import numpy as np

from .skeleton import Pose

DILATE_KERNEL = 7
DILATE_ITERATIONS = 3
PERSON_THRESHOLD = 128  # selfie-segmenter confidence >= 0.5


def person_mask(confidence: np.ndarray, pose: Pose, threshold: float = 0.5) -> np.ndarray:
    """(H, W) {0, 1} uint8: the segmented regions that belong to the posed person.

    The segmenter marks every person-like region; keeping only the connected components that contain a
    confident body or hand point (the reference prompts SAM2 with body points) drops other people and blobs."""
    binary = (confidence >= PERSON_THRESHOLD).astype(np.uint8)
    count, labels = cv2.connectedComponents(binary, connectivity=8)
    if count <= 1:
        return binary
    height, width = binary.shape
    keep = set()
    for x, y, conf in np.vstack([pose.body, pose.left_hand, pose.right_hand]):
        if conf >= threshold:
            col, row = int(x), int(y)
            if 0 <= col < width and 0 <= row < height and labels[row, col] > 0:
                keep.add(int(labels[row, col]))
    if not keep:  # the pose sits outside every region: trust the segmentation's largest region
        areas = np.bincount(labels.ravel())[1:]
        keep.add(int(np.argmax(areas)) + 1)
    return np.isin(labels, list(keep)).astype(np.uint8)


def pose_hull_mask(pose: Pose, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Fallback when segmentation finds nobody: the convex hull of the confident body and hand points."""
    points = np.vstack([pose.body, pose.left_hand, pose.right_hand])
    points = points[points[:, 2] >= threshold][:, :2]
    mask = np.zeros(shape, dtype=np.uint8)
    if len(points) >= 3:
        cv2.fillConvexPoly(mask, cv2.convexHull(points.astype(np.int32)), 1)
    return mask


def box_filled(mask: np.ndarray, w_len: int = 1, h_len: int = 1) -> np.ndarray:
    """The reference's get_aug_mask: split the mask's bounding box into a w_len x h_len grid and fill every cell
    holding any mask pixel (1 x 1: the box [x_min, x_max) x [y_min, y_max), excluding its last row/column)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask.copy()
    out = mask.copy()
    x_min, x_max, y_min, y_max = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    w_step = max(int((x_max - x_min) / w_len), 1)  # the reference's step would be 0 for a 1-pixel-wide mask
    h_step = max(int((y_max - y_min) / h_len), 1)
    for x0 in range(x_min, x_max, w_step):
        x1 = min(x0 + w_step, x_max)
        for y0 in range(y_min, y_max, h_step):
            y1 = min(y0 + h_step, y_max)
            if mask[y0:y1, x0:x1].sum() > 0:
                out[y0:y1, x0:x1] = 1
    return out


def character_mask(person: np.ndarray, k: int = DILATE_KERNEL, iterations: int = DILATE_ITERATIONS) -> np.ndarray:
    """Dilate (k x k ones, `iterations` times) and box-fill, as the reference does; iterations 0 keeps it raw."""
    if iterations == 0:
        return person
    dilated = cv2.dilate(person, np.ones((k, k), np.uint8), iterations=iterations)
    return box_filled(dilated)


def background(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The driving frame with the character region blacked out: frame x (1 - mask)."""
    return frame * (1 - mask[:, :, None])


def mask_frame(mask: np.ndarray) -> np.ndarray:
    """The mask as the 3-channel 0/255 picture src_mask.mp4 stores."""
    return np.repeat(mask[:, :, None] * 255, 3, axis=2).astype(np.uint8)
