"""Draws skeletons exactly in the reference's "v2" pose style (the pictures Animate-14B was trained on).

Drawing only, onto RGB uint8 canvases; no detection, no file I/O.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from .skeleton import Pose

THRESHOLD = 0.5  # every body point, limb and hand element needs confidence >= 0.5
HAND_EPS = 0.01  # the reference skips hand points whose int pixel coordinate is not > 0.01 (i.e. at x or y = 0)

# Limbs as 1-based body indices with their RGB colours, in the reference's drawing order.
LIMBS: tuple[tuple[int, int], ...] = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
    (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (14, 19), (11, 20),
)  # fmt: skip
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (200, 200, 0), (100, 100, 0),
)  # fmt: skip
# Limb i is filled with COLORS[i] x 0.6 (each channel truncated to int); joint i with COLORS[i] at full intensity.
LIMB_COLORS = tuple(tuple(int(float(c) * 0.6) for c in color) for color in COLORS[: len(LIMBS)])
HAND_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
HAND_POINT_COLOR = (0, 0, 255)  # pure blue in the RGB canvas


def hand_edge_color(edge: int) -> tuple[float, float, float]:
    """HSV(edge / 20, 1, 1) x 255 as floats; OpenCV rounds them when drawing, as in the reference."""
    red, green, blue = colorsys.hsv_to_rgb(edge / len(HAND_EDGES), 1.0, 1.0)
    return red * 255, green * 255, blue * 255


def body_stick_width(height: int, width: int) -> int:
    return max(int(min(height, width) / 200) - 1, 1)


def hand_stick_width(height: int, width: int) -> int:
    return max(body_stick_width(height, width) // 2, 1)


def draw_pose(canvas: np.ndarray, pose: Pose) -> np.ndarray:
    """Draw body limbs, body joints, then the left and right hand onto `canvas` (modified and returned).
    Face landmarks are not drawn; the head is (nose, eyes, ears)."""
    height, width = canvas.shape[:2]
    stick = body_stick_width(height, width)
    for (a, b), color in zip(LIMBS, LIMB_COLORS, strict=True):
        _draw_limb(canvas, pose.body[a - 1], pose.body[b - 1], stick, color)
    for point, color in zip(pose.body, COLORS, strict=True):
        if point[2] >= THRESHOLD:
            cv2.circle(canvas, (int(point[0]), int(point[1])), stick, color, thickness=-1)
    for hand in (pose.left_hand, pose.right_hand):
        _draw_hand(canvas, hand, hand_stick_width(height, width))
    return canvas


def _draw_limb(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, stick: int, color: tuple[int, ...]) -> None:
    if start[2] < THRESHOLD or end[2] < THRESHOLD:
        return
    centre = (int((start[0] + end[0]) / 2), int((start[1] + end[1]) / 2))
    length = math.hypot(start[0] - end[0], start[1] - end[1])
    angle = math.degrees(math.atan2(start[1] - end[1], start[0] - end[0]))
    polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, color)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, stick: int) -> None:
    pixels = [(int(x), int(y)) for x, y in hand[:, :2]]
    drawable = [hand[i, 2] >= THRESHOLD and x > HAND_EPS and y > HAND_EPS for i, (x, y) in enumerate(pixels)]
    for edge, (a, b) in enumerate(HAND_EDGES):
        if drawable[a] and drawable[b]:
            cv2.line(canvas, pixels[a], pixels[b], hand_edge_color(edge), thickness=stick)
    for point, ok in zip(pixels, drawable, strict=True):
        if ok:
            cv2.circle(canvas, point, stick, HAND_POINT_COLOR, thickness=-1)


def render_pose(pose: Pose) -> np.ndarray:
    """A black canvas of the pose's size with the pose drawn on it."""
    return draw_pose(np.zeros((pose.height, pose.width, 3), dtype=np.uint8), pose)


def draw_preview(frame: np.ndarray, pose: Pose, face_box: tuple[int, int, int, int] | None) -> np.ndarray:
    """The driving frame with the extracted pose drawn over it and the face crop box in white."""
    overlay = draw_pose(frame.copy(), pose)
    if face_box is not None:
        x1, x2, y1, y2 = face_box
        thickness = max(int(min(frame.shape[:2]) / 300), 1)
        cv2.rectangle(overlay, (x1, y1), (x2, y2), (255, 255, 255), thickness)
    return overlay
