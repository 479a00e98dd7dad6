"""Animation-mode retargeting (§9.6): the driving skeleton re-proportioned to the character, angles kept.

Follows the reference's heuristic (global scale from nose-to-ankle/hip height, per-limb length ratios with
symmetric pairs tied, feet capped, ground/neck anchoring, hands scaled about their roots); no FLUX edits.
Pure arithmetic on Pose objects; it must not run a model or draw.
"""

from __future__ import annotations

import math

import numpy as np

from .render import LIMBS
from .skeleton import LEFT_WRIST, RIGHT_WRIST, Pose

BODY_THRESHOLD = 0.4  # the reference's threshold for body-type checks and hands
NOSE, NECK, R_HIP, R_ANKLE, L_HIP, L_ANKLE, L_TOE, R_TOE = 0, 1, 8, 10, 11, 13, 18, 19
# Limb indices (into LIMBS) tied to the larger ratio of the pair: shoulders, upper arms, forearms,
# neck-to-hips, thighs, shins, feet; nose-eye and eye-ear pairs are averaged instead.
SYMMETRIC_MAX = ((0, 1), (2, 4), (3, 5), (6, 9), (7, 10), (8, 11), (17, 18))
SYMMETRIC_MEAN = ((13, 15), (14, 16))
FOOT_CAPS = ((18, 8), (17, 11))  # (foot limb, shin limb): a foot is at most half its shin
FOOT_TO_SHIN = 0.5


def _height(pose: Pose, lower: tuple[int, int]) -> float:
    return abs(pose.body[list(lower), 1].mean() - pose.body[NOSE, 1])


def _visible(pose: Pose, indices: tuple[int, ...]) -> bool:
    return bool(all(pose.body[i, 2] > 0.5 for i in indices))


def global_scale(source: Pose, target: Pose) -> float:
    """source height / target height, from nose to ankles, else to hips, else from the canvas areas."""
    for lower in ((R_ANKLE, L_ANKLE), (R_HIP, L_HIP)):
        if _visible(source, (NOSE, *lower)) and _visible(target, (NOSE, *lower)):
            source_h, target_h = _height(source, lower), _height(target, lower)
            if source_h > 0 and target_h > 0:
                return source_h / target_h
    return math.sqrt(source.width * source.height) / math.sqrt(target.width * target.height)


def body_type(pose: Pose) -> int:
    """2 full body (ankles and hips inside the picture), 1 three-quarter (hips), 0 half body."""
    def inside(index: int) -> bool:
        return pose.body[index, 1] <= pose.height and pose.body[index, 2] >= BODY_THRESHOLD

    if all(inside(i) for i in (R_ANKLE, L_ANKLE, R_HIP, L_HIP)):
        return 2
    return 1 if inside(R_HIP) and inside(L_HIP) else 0


def limb_lengths(body: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(body[a - 1, :2] - body[b - 1, :2]) for a, b in LIMBS])


def limb_ratios(source: Pose, target_scaled: Pose) -> np.ndarray:
    """Per-limb target/source length ratios with the reference's symmetric tying."""
    source_len, target_len = limb_lengths(source.body), limb_lengths(target_scaled.body)
    ratios = np.where(source_len > 0, target_len / np.maximum(source_len, 1e-9), -1.0)
    if ratios[0] > 0 and ratios[1] > 0:
        ratios[ratios < 0] = (ratios[0] + ratios[1]) / 2
    ratios[ratios < 0] = 1.0  # degenerate limbs (zero length on both sides) keep their length
    for a, b in SYMMETRIC_MAX:
        ratios[a] = ratios[b] = max(ratios[a], ratios[b])
    for a, b in SYMMETRIC_MEAN:
        ratios[a] = ratios[b] = (ratios[a] + ratios[b]) / 2
    return ratios


def rebuild(body: np.ndarray, ratios: np.ndarray, cap_feet: bool) -> np.ndarray:
    """Walk the limbs outward from the neck: child = parent - ratio * length * direction(parent - child)."""
    lengths = limb_lengths(body) * ratios
    if cap_feet:
        for foot, shin in FOOT_CAPS:
            lengths[foot] = min(lengths[foot], lengths[shin] * FOOT_TO_SHIN)
    out = body.copy()
    for (a, b), length in zip(LIMBS, lengths, strict=True):
        dx, dy = body[a - 1, 0] - body[b - 1, 0], body[a - 1, 1] - body[b - 1, 1]
        angle = math.atan2(dy, dx)
        out[b - 1, 0] = out[a - 1, 0] - length * math.cos(angle)
        out[b - 1, 1] = out[a - 1, 1] - length * math.sin(angle)
    return out


def _anchor_offset(rebuilt_first: np.ndarray, target_scaled: Pose, full_body: bool) -> np.ndarray:
    """Translation that puts the rebuilt first frame's ground point (full body) or neck onto the target's."""
    target = target_scaled.body
    if full_body:
        ground_y = max((target[R_ANKLE, 1] + target[R_TOE, 1]) / 2, (target[L_ANKLE, 1] + target[L_TOE, 1]) / 2)
        source_y = max(rebuilt_first[R_ANKLE, 1], rebuilt_first[L_ANKLE, 1])
        source_x = (rebuilt_first[R_HIP, 0] + rebuilt_first[L_HIP, 0]) / 2
        return np.array([source_x - (target[R_HIP, 0] + target[L_HIP, 0]) / 2, source_y - ground_y])
    return rebuilt_first[NECK, :2] - target[NECK, :2]


def _moved_hand(hand: np.ndarray, wrist_to: np.ndarray, scale: float) -> np.ndarray:
    """The hand scaled by `scale` about its root, with the root placed on the retargeted wrist."""
    out = hand.copy()
    root = hand[0, :2]
    out[:, :2] = np.trunc(wrist_to + (hand[:, :2] - root) * scale)
    out[hand[:, 2] < BODY_THRESHOLD, 2] = 0.0
    return out


def retarget_frame(pose: Pose, ratios: np.ndarray, offset: np.ndarray, scale: float, hand_scale: float,
                   width: int, height: int) -> Pose:  # fmt: skip
    body = rebuild(pose.body, ratios, cap_feet=True)
    body[:, :2] = (body[:, :2] - offset) / scale
    hands = {}
    for name, hand in (("left", pose.left_hand), ("right", pose.right_hand)):
        # the hand follows the wrist its root is nearest to in the driving frame
        near_left = np.linalg.norm(hand[0, :2] - pose.body[LEFT_WRIST, :2]) <= np.linalg.norm(
            hand[0, :2] - pose.body[RIGHT_WRIST, :2])  # fmt: skip
        wrist = body[LEFT_WRIST if near_left else RIGHT_WRIST, :2]
        hands[name] = _moved_hand(hand, wrist, hand_scale) if hand[:, 2].max() > 0 else hand.copy()
    return Pose(body, hands["left"], hands["right"], width, height)


def retarget(first: Pose, character: Pose, poses: list[Pose]) -> list[Pose]:
    """Driving poses (canvas of the driving video) re-proportioned onto the character's canvas."""
    scale = global_scale(first, character)
    scaled_w, scaled_h = int(character.width * scale), int(character.height * scale)
    target_scaled = character.scaled(scaled_w, scaled_h)
    ratios = limb_ratios(first, target_scaled)
    full_body = min(body_type(first), body_type(character)) == 2
    offset = _anchor_offset(rebuild(first.body, ratios, cap_feet=False), target_scaled, full_body)
    hand_scale = max(ratios[0], ratios[1]) / scale
    return [retarget_frame(p, ratios, offset, scale, hand_scale, character.width, character.height) for p in poses]
