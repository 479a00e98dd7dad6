"""The OpenPose-style skeleton the Animate model was trained on, built from mediapipe's landmarks.

Mapping tables (as data) and pure conversions; no model runs here and nothing is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 20-point body of the reference (OpenPose-18 order + two toes). Each row: the mediapipe pose landmarks whose
# mean gives the point (one index = that landmark). Mediapipe's 33 points: 0 nose, 2/5 left/right eye,
# 7/8 left/right ear, 11/12 shoulders, 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles,
# 29/30 heels, 31/32 foot index (toe tip); "left" is the person's left, as in COCO.
BODY_FROM_MEDIAPIPE: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("nose", (0,)),  # 0: mediapipe nose
    ("neck", (12, 11)),  # 1: midpoint of the shoulders, as the reference defines the neck
    ("right_shoulder", (12,)),  # 2
    ("right_elbow", (14,)),  # 3
    ("right_wrist", (16,)),  # 4
    ("left_shoulder", (11,)),  # 5
    ("left_elbow", (13,)),  # 6
    ("left_wrist", (15,)),  # 7
    ("right_hip", (24,)),  # 8
    ("right_knee", (26,)),  # 9
    ("right_ankle", (28,)),  # 10
    ("left_hip", (23,)),  # 11
    ("left_knee", (25,)),  # 12
    ("left_ankle", (27,)),  # 13
    ("right_eye", (5,)),  # 14: mediapipe's eye centre (not the inner/outer corners 4/6)
    ("left_eye", (2,)),  # 15: eye centre (corners are 1/3)
    ("right_ear", (8,)),  # 16
    ("left_ear", (7,)),  # 17
    ("left_toe", (31,)),  # 18: COCO averages big and small toe; mediapipe has one toe point, the foot index
    ("right_toe", (32,)),  # 19: likewise
)
BODY_POINTS = len(BODY_FROM_MEDIAPIPE)
HAND_POINTS = 21  # mediapipe's hand points are in the OpenPose hand order (wrist, then 4 per finger)
RIGHT_WRIST, LEFT_WRIST = 4, 7

# 68-point (iBUG/dlib) face outline picked from mediapipe's 478-point face mesh. The crop only uses the
# bounding box of these points, so what matters is that the extremes match the 68-point layout: the jaw line
# runs from the temple beside one eye round the chin to the other temple (68-pt jaw starts at ear level), the
# brows give the top. Indices follow the widely used mesh-to-68 correspondence, region by region:
FACE68_FROM_MESH: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("jaw", (127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356)),  # 0-16
    ("right_brow", (70, 63, 105, 66, 107)),  # 17-21: upper brow edge, outer to inner
    ("left_brow", (336, 296, 334, 293, 300)),  # 22-26
    ("nose_bridge", (168, 197, 5, 4)),  # 27-30: between the eyes down to the tip
    ("nose_base", (75, 97, 2, 326, 305)),  # 31-35: nostril wings and columella
    ("right_eye", (33, 160, 158, 133, 153, 144)),  # 36-41: outer corner, upper lid, inner corner, lower lid
    ("left_eye", (362, 385, 387, 263, 373, 380)),  # 42-47
    ("outer_lips", (61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181)),  # 48-59
    ("inner_lips", (78, 82, 13, 312, 308, 317, 14, 87)),  # 60-67
)
FACE68_INDICES: tuple[int, ...] = tuple(i for _, group in FACE68_FROM_MESH for i in group)
assert len(FACE68_INDICES) == 68


@dataclass
class Pose:
    """One frame's skeleton in pixels of a canvas of (width, height): rows are [x, y, confidence]."""

    body: np.ndarray  # (20, 3)
    left_hand: np.ndarray  # (21, 3)
    right_hand: np.ndarray  # (21, 3)
    width: int
    height: int

    def copy(self) -> Pose:
        return Pose(self.body.copy(), self.left_hand.copy(), self.right_hand.copy(), self.width, self.height)

    def scaled(self, width: int, height: int) -> Pose:
        """The same pose on a canvas of another size (coordinates scaled, confidences kept)."""
        factor = np.array([width / self.width, height / self.height, 1.0])
        return Pose(self.body * factor, self.left_hand * factor, self.right_hand * factor, width, height)


def empty_hand() -> np.ndarray:
    """A hand that is not drawn (confidence 0)."""
    return np.zeros((HAND_POINTS, 3))


def body_from_landmarks(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """(33, 4) mediapipe rows [x, y, visibility, presence] (normalised) -> (20, 3) [x, y, conf] in pixels.

    Confidence is min(visibility, presence): a point must be both in the picture and unoccluded to be drawn.
    Mediapipe also extrapolates points beyond the image edge (e.g. knees under the frame); the reference's
    heatmap detector cannot place a point outside its crop, so such points get confidence 0."""
    points = np.zeros((BODY_POINTS, 3))
    confidence = np.minimum(landmarks[:, 2], landmarks[:, 3])
    for row, (_, sources) in enumerate(BODY_FROM_MEDIAPIPE):
        index = list(sources)
        points[row, 0] = landmarks[index, 0].mean() * width
        points[row, 1] = landmarks[index, 1].mean() * height
        points[row, 2] = confidence[index].mean()
    outside = (points[:, 0] < 0) | (points[:, 0] >= width) | (points[:, 1] < 0) | (points[:, 1] >= height)
    points[outside, 2] = 0.0
    return points


def hands_from_landmarks(
    hands: list[tuple[np.ndarray, float]], body: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assign up to two detected hands ((21, 2) normalised points, score) to the body's wrists.

    Mediapipe's handedness label assumes a mirrored selfie image, so sides are decided by which wrist of the
    body is nearer to each hand's root instead; every point of a hand gets the hand's detection score."""
    left, right = empty_hand(), empty_hand()
    pixel_hands = [_pixel_hand(points, score, width, height) for points, score in hands[:2]]
    wrists = {"left": body[LEFT_WRIST, :2], "right": body[RIGHT_WRIST, :2]}
    if len(pixel_hands) == 1:
        hand = pixel_hands[0]
        side = min(wrists, key=lambda s: np.linalg.norm(hand[0, :2] - wrists[s]))
        return (hand, right) if side == "left" else (left, hand)
    if len(pixel_hands) == 2:
        first, second = pixel_hands
        straight = np.linalg.norm(first[0, :2] - wrists["left"]) + np.linalg.norm(second[0, :2] - wrists["right"])
        crossed = np.linalg.norm(first[0, :2] - wrists["right"]) + np.linalg.norm(second[0, :2] - wrists["left"])
        return (first, second) if straight <= crossed else (second, first)
    return left, right


def _pixel_hand(points: np.ndarray, score: float, width: int, height: int) -> np.ndarray:
    hand = np.empty((HAND_POINTS, 3))
    hand[:, 0] = points[:, 0] * width
    hand[:, 1] = points[:, 1] * height
    hand[:, 2] = score
    return hand


def face68_from_mesh(mesh: np.ndarray, width: int, height: int) -> np.ndarray:
    """(478, 2) normalised face-mesh points -> the (68, 2) outline subset in pixels."""
    return mesh[list(FACE68_INDICES), :2] * np.array([width, height])


def face_points_from_head(body: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """Fallback face outline when the face mesh finds nothing: the visible head points (nose, eyes, ears) of the
    body, stretched downwards to the chin (about the eye-to-nose distance twice below the nose)."""
    head = body[[0, 14, 15, 16, 17]]
    visible = head[head[:, 2] >= threshold]
    if len(visible) < 3:
        return None
    nose, eyes_y = body[0, :2], head[1:3, 1].mean()
    chin = nose + np.array([0.0, 2.0 * max(nose[1] - eyes_y, 1.0)])
    brow = np.array([nose[0], eyes_y - max(nose[1] - eyes_y, 1.0)])
    return np.vstack([visible[:, :2], chin, brow])
