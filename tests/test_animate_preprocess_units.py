"""Unit checks of the animate preprocessing arithmetic: reference formulas, palette, mapping, masks, retarget.

Synthetic inputs with hand-computed expectations; no mediapipe runs here.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.preprocess.animate import geometry, mask, render, skeleton
from pipeline.preprocess.animate.retarget import limb_lengths, retarget
from pipeline.preprocess.animate.skeleton import Pose

# The reference palette written out by hand (WAN_SPEC §9.3): limb colours are these x 0.6, truncated.
REFERENCE_LIMB_COLORS = [
    (153, 0, 0), (153, 51, 0), (153, 102, 0), (153, 153, 0), (102, 153, 0), (51, 153, 0), (0, 153, 0),
    (0, 153, 51), (0, 153, 102), (0, 153, 153), (0, 102, 153), (0, 51, 153), (0, 0, 153), (51, 0, 153),
    (102, 0, 153), (153, 0, 153), (153, 0, 102), (153, 0, 51), (120, 120, 0),
]  # fmt: skip


def spread_pose(width: int = 1200, height: int = 1200) -> Pose:
    """A frontal, full-body pose with well separated limbs and two open hands, every point confident."""
    body = np.array([
        [600, 200], [600, 300], [500, 300], [400, 450], [300, 600], [700, 300], [800, 450], [900, 600],
        [530, 600], [520, 800], [510, 1000], [670, 600], [680, 800], [690, 1000], [570, 170], [630, 170],
        [530, 190], [670, 190], [740, 1060], [460, 1060],
    ], dtype=float)  # fmt: skip
    body = np.hstack([body, np.ones((20, 1))])

    def hand(root_x: float, direction: float) -> np.ndarray:
        points = [[root_x, 700]]
        for finger in range(5):
            for joint in range(1, 5):
                points.append([root_x + direction * (finger - 2) * 25, 700 + joint * 22])
        return np.hstack([np.array(points, dtype=float), np.ones((21, 1))])

    return Pose(body, hand(900, 1), hand(300, -1), width, height)


def colours_of(canvas: np.ndarray) -> set[tuple[int, int, int]]:
    packed = canvas[..., 0].astype(np.int32) << 16 | canvas[..., 1].astype(np.int32) << 8 | canvas[..., 2]
    return {(int(v) >> 16, int(v) >> 8 & 255, int(v) & 255) for v in np.unique(packed)}


def test_limb_colours_are_the_reference_palette_times_0_6() -> None:
    pose = spread_pose()
    pose.left_hand[:, 2] = pose.right_hand[:, 2] = 0  # body only
    canvas = render.render_pose(pose)
    for (a, b), expected in zip(render.LIMBS, REFERENCE_LIMB_COLORS, strict=True):
        # a point 30% along the limb is inside the limb's ellipse and away from both joints
        x, y = pose.body[a - 1, :2] * 0.7 + pose.body[b - 1, :2] * 0.3
        assert tuple(int(v) for v in canvas[int(y), int(x)]) == expected, (a, b)
    allowed = set(REFERENCE_LIMB_COLORS) | set(render.COLORS) | {(0, 0, 0)}
    assert colours_of(canvas) <= allowed  # LINE_8, no anti-aliasing: no blended colours anywhere
    assert set(REFERENCE_LIMB_COLORS) <= colours_of(canvas)


def test_joints_are_full_colour_circles_of_the_stick_width() -> None:
    pose = spread_pose()
    canvas = render.render_pose(pose)
    for point, colour in zip(pose.body, render.COLORS, strict=True):
        assert tuple(int(v) for v in canvas[int(point[1]), int(point[0])]) in {colour} | set(
            REFERENCE_LIMB_COLORS
        )
    # the right toe (index 19) is drawn last among the joints in (100, 100, 0)
    toe = pose.body[19]
    assert tuple(canvas[int(toe[1]), int(toe[0])]) == (100, 100, 0)


def test_hand_edges_use_hsv_colours_and_points_are_blue() -> None:
    pose = spread_pose()
    pose.body[:, 2] = 0  # hands only
    canvas = render.render_pose(pose)
    hsv_colours = {tuple(int(np.rint(c)) for c in render.hand_edge_color(i)) for i in range(20)}
    # hue 0, 0.05, 0.4, 0.95 (edges 0, 1, 8, 19); 0.3 x 255 comes out as 76.500...01 in floats, drawn as 77
    assert {(255, 0, 0), (255, 77, 0), (0, 255, 102), (255, 0, 77)} <= hsv_colours
    assert len(hsv_colours) == 20
    for point in np.vstack([pose.left_hand, pose.right_hand]):
        assert tuple(canvas[int(point[1]), int(point[0])]) == (0, 0, 255)  # blue hand points
    assert colours_of(canvas) <= hsv_colours | {(0, 0, 255), (0, 0, 0)}


def test_low_confidence_and_edge_points_are_not_drawn() -> None:
    pose = spread_pose()
    pose.body[:, 2] = 0.49
    pose.left_hand[:, 2] = 0.49
    pose.right_hand[:, :2] = 0  # at the image corner: the reference's x, y > 0.01 test drops it
    assert not render.render_pose(pose).any()


def test_stick_widths_follow_the_canvas_size() -> None:
    assert [
        render.body_stick_width(h, w) for h, w in ((720, 1280), (1080, 1920), (352, 640), (144, 176))
    ] == [2, 4, 1, 1]
    assert [render.hand_stick_width(h, w) for h, w in ((720, 1280), (1080, 1920), (1600, 1600))] == [1, 2, 3]


def test_limb_is_the_ellipse_polygon_of_the_reference() -> None:
    pose = spread_pose(200, 200)
    pose.body[:, 2] = 0
    pose.left_hand[:, 2] = pose.right_hand[:, 2] = 0
    pose.body[[1, 2], :] = [[50, 50, 1], [150, 120, 1]]  # only the neck-right-shoulder limb, joints drawn too
    canvas = render.render_pose(pose)
    expected = np.zeros_like(canvas)
    length = math.hypot(100, 70)
    polygon = cv2.ellipse2Poly(
        (100, 85), (int(length / 2), 1), int(math.degrees(math.atan2(-70, -100))), 0, 360, 1
    )
    cv2.fillConvexPoly(expected, polygon, (153, 0, 0))
    cv2.circle(expected, (50, 50), 1, (255, 85, 0), -1)
    cv2.circle(expected, (150, 120), 1, (255, 170, 0), -1)
    assert np.array_equal(canvas, expected)


@pytest.mark.parametrize(
    ("size", "area", "expected"),
    [((1280, 720), 1280 * 720, (1280, 720)), ((1920, 1080), 1280 * 720, (1280, 720)),
     ((176, 144), 1280 * 720, (1056, 864)), ((832, 1104), 1280 * 720, (832, 1104)),
     ((1920, 1080), 640 * 360, (640, 352)), ((1000, 1000), 1280 * 720, (960, 960))],
)  # fmt: skip
def test_size_by_area_is_the_floor_to_16_fallback(
    size: tuple[int, int], area: int, expected: tuple[int, int]
) -> None:
    assert geometry.size_by_area(*size, area) == expected


def test_padding_resize_letterboxes_with_black_bars() -> None:
    image = np.full((100, 200, 3), 200, np.uint8)
    out = geometry.padding_resize(image, 160, 160)
    # width-bound: 160 x int(160 / 200 * 100) = 80 rows, centred with int((160 - 80) / 2) = 40 black rows above
    assert out.shape == (160, 160, 3)
    assert not out[:40].any() and not out[120:].any() and (out[40:120] == 200).all()


def test_frame_indices_resample_like_the_reference() -> None:
    assert geometry.sample_indices(5, 10, 4) == [0, 2]  # int(5 / 10 * 4) = 2 frames; round(2.5) = 2
    assert geometry.sample_indices(106, 30, 30) == list(range(106))
    assert geometry.sample_indices(50, 25, 30)[:7] == [
        0,
        1,
        2,
        2,
        3,
        4,
        5,
    ]  # round(i * 25 / 30), half to even
    assert len(geometry.sample_indices(50, 25, 30)) == 60
    assert geometry.sample_indices(120, 30000 / 1001, 10)[-1] == 117  # round(39 / 10 * 29.97) = 117


def test_face_box_grows_by_sqrt_1_3_and_three_times_upwards() -> None:
    points = np.array([[100, 100], [200, 300], [150, 200]], dtype=float)
    # w=100, h=200, area 26000: w' = sqrt(13000) = 114.02, h' = sqrt(52000) = 228.04, dx = 7.01, dy = 7.01
    assert geometry.face_crop_box(points, 1000, 1000) == (92, 207, 78, 307)
    assert geometry.face_crop_box(points, 205, 1000) == (92, 205, 78, 307)  # clipped to the frame
    crop = geometry.crop_face(np.zeros((50, 50, 3), np.uint8), (60, 60, 60, 60))  # empty box: still 512x512
    assert crop.shape == (512, 512, 3)


def test_body_mapping_takes_shoulder_midpoint_for_neck_and_min_visibility_presence() -> None:
    landmarks = np.zeros((33, 4))
    landmarks[:, :2] = 0.5
    landmarks[:, 2:] = 0.9
    landmarks[11, :2], landmarks[12, :2] = (0.6, 0.4), (0.4, 0.5)  # left / right shoulder
    landmarks[31, :2], landmarks[32, :2] = (0.7, 0.9), (0.3, 0.95)  # left / right foot index
    landmarks[5, 3] = 0.2  # right eye barely present
    landmarks[26, 1] = 1.2  # right knee below the picture
    body = skeleton.body_from_landmarks(landmarks, 200, 100)
    assert body[1].tolist() == pytest.approx([100, 45, 0.9])  # neck
    assert body[2].tolist() == pytest.approx([80, 50, 0.9]) and body[5].tolist() == pytest.approx(
        [120, 40, 0.9]
    )
    assert body[18, :2].tolist() == pytest.approx([140, 90]) and body[19, :2].tolist() == pytest.approx(
        [60, 95]
    )
    assert body[14, 2] == pytest.approx(0.2)
    assert body[9, 2] == 0.0


def test_hands_follow_the_nearest_wrist_whatever_mediapipe_calls_them() -> None:
    body = np.zeros((20, 3))
    body[skeleton.LEFT_WRIST, :2] = (150, 50)
    body[skeleton.RIGHT_WRIST, :2] = (50, 50)
    near_right = np.full((21, 2), 0.26)
    near_left = np.full((21, 2), 0.74)
    left, right = skeleton.hands_from_landmarks([(near_right, 0.9), (near_left, 0.8)], body, 200, 200)
    assert left[0, :2].tolist() == pytest.approx([148, 148]) and left[0, 2] == pytest.approx(0.8)
    assert right[0, :2].tolist() == pytest.approx([52, 52])
    left, right = skeleton.hands_from_landmarks([(near_left, 0.7)], body, 200, 200)
    assert left[0, 2] == pytest.approx(0.7) and right[:, 2].max() == 0


def test_face_subset_has_68_distinct_mesh_points() -> None:
    assert len(skeleton.FACE68_INDICES) == 68 and len(set(skeleton.FACE68_INDICES)) == 68
    assert max(skeleton.FACE68_INDICES) < 478
    mesh = np.random.default_rng(0).random((478, 2))
    assert skeleton.face68_from_mesh(mesh, 10, 20)[8].tolist() == pytest.approx(
        (mesh[152] * [10, 20]).tolist()
    )


def test_box_fill_matches_the_reference_get_aug_mask() -> None:
    person = np.zeros((40, 60), np.uint8)
    person[5:10, 10:15] = 1
    person[30:35, 40:50] = 1
    filled = mask.box_filled(person)
    expected = person.copy()
    expected[5:34, 10:49] = 1  # [y_min, y_max) x [x_min, x_max): the last row and column stay as they were
    assert np.array_equal(filled, expected)


def test_person_mask_keeps_only_regions_holding_the_pose() -> None:
    confidence = np.zeros((100, 100), np.uint8)
    confidence[10:60, 10:40] = 230  # the posed person
    confidence[10:60, 70:90] = 230  # someone else
    pose = spread_pose(100, 100)
    pose.body[:, :2] = (25, 30)
    pose.left_hand[:, 2] = pose.right_hand[:, 2] = 0
    kept = mask.person_mask(confidence, pose)
    assert kept[30, 25] == 1 and kept[30, 80] == 0
    final = mask.character_mask(kept)
    assert final[5, 25] == 1 and final[30, 80] == 0  # dilated 3 x 3 px upwards, the other person untouched
    background = mask.background(np.full((100, 100, 3), 9, np.uint8), final)
    assert background[30, 25].tolist() == [0, 0, 0] and background[30, 80].tolist() == [9, 9, 9]


def test_retarget_onto_a_scaled_copy_reproduces_the_copy() -> None:
    driving = spread_pose(1200, 1200)
    driving.body[[10, 13], 2] = 0.1  # ankles unseen: a half body, anchored at the neck
    character = driving.scaled(600, 600)  # the same person, half size, on a smaller canvas
    out = retarget(driving, character, [driving])[0]
    assert (out.width, out.height) == (600, 600)
    assert out.body[:, :2] == pytest.approx(character.body[:, :2], abs=1.0)


def test_retarget_full_body_puts_the_driving_ankles_on_the_character_feet() -> None:
    # Full body: the reference matches the lowest rebuilt ankle (y 1000) to the character's lowest ankle-toe
    # midpoint ((1000 + 1060) / 2 = 1030), so a scaled copy comes out 30 / 2 = 15 px lower on the half canvas.
    driving = spread_pose(1200, 1200)
    character = driving.scaled(600, 600)
    out = retarget(driving, character, [driving])[0]
    assert out.body[:, :2] == pytest.approx(character.body[:, :2] + [0, 15], abs=1.0)


def test_retarget_keeps_driving_angles_with_character_proportions() -> None:
    first = spread_pose()
    character = spread_pose()
    arm = character.body[3, :2] - character.body[2, :2]
    character.body[3:5, :2] = character.body[2, :2] + np.array([[1.5], [3.0]]) * arm  # arms 1.5x longer
    moved = first.copy()
    moved.body[4, :2] = moved.body[3, :2] + [0, 212]  # the forearm now points straight down
    out = retarget(first, character, [first, moved])
    assert limb_lengths(out[0].body)[2] == pytest.approx(limb_lengths(character.body)[2], rel=0.01)
    forearm = out[1].body[4, :2] - out[1].body[3, :2]
    assert forearm[0] == pytest.approx(0, abs=1.5) and forearm[1] > 0  # driving angle kept
    shoulder_to_elbow = limb_lengths(out[1].body)[2]
    assert shoulder_to_elbow == pytest.approx(limb_lengths(character.body)[2], rel=0.01)


def test_frames_without_detection_reuse_the_last_good_one() -> None:
    from pipeline.preprocess.animate.errors import NoPersonError
    from pipeline.preprocess.animate.job import fill_gaps

    a, b = spread_pose(), spread_pose(600, 600)
    assert fill_gaps([None, a, None, None, b, None], "body pose", Path("v.mp4")) == [a, a, a, a, b, b]
    with pytest.raises(NoPersonError, match="no body pose in any of 3 frames") as error:
        fill_gaps([None, None, None], "body pose", Path("v.mp4"))
    assert error.value.field == "video" and error.value.value == "v.mp4"


def test_face_falls_back_to_the_head_points_of_the_pose() -> None:
    from pipeline.preprocess.animate.job import Findings, face_outlines

    pose = spread_pose()
    mesh_face = np.array([[580.0, 150.0], [620.0, 230.0]])
    findings = Findings(poses=[pose, pose, None], faces=[mesh_face, None, None], persons=[None] * 3)
    outlines = face_outlines(findings, [pose, pose, pose])
    assert outlines[0] is mesh_face and outlines[2] is None  # no own pose: left for fill_gaps
    x1, x2, y1, y2 = geometry.face_crop_box(outlines[1], 1200, 1200)
    nose = pose.body[0]
    assert x1 < pose.body[16, 0] and x2 > pose.body[17, 0]  # both ears inside
    assert y1 < pose.body[14, 1] < nose[1] < y2  # from above the eyes to below the nose
