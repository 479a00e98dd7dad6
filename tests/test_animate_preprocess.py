"""End-to-end animate preprocessing on the real test media: sizes, fps, counts, poses, faces, masks.

Each job runs once per session at a reduced frame rate and area to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mediapipe_models import mediapipe_models_dir  # noqa: E402

from pipeline.preprocess.animate import preprocess_animate_job  # noqa: E402
from pipeline.preprocess.animate.models import find_models  # noqa: E402
from pipeline.preprocess.animate.video_io import decode_all, read_frames  # noqa: E402
from pipeline.preprocess.animate.worker import DetectorProcess  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# Hand-labelled boxes, as fractions (x1, y1, x2, y2) of the frame. Labelled by writing frames 0, 48 and 96 of
# animate_driving.mp4 at 800x450 with a 50-px grid to PNG and reading the grid off by eye: "person" boxes lie
# wholly inside the host (face, shirt and tie), "background" boxes wholly on the DOPING panel and the studio
# wall at the far left, outside the host's bounding box in every frame.
DRIVING_PERSON = {0: [(480, 50, 560, 150), (470, 200, 590, 370)],
                  48: [(470, 50, 550, 150), (480, 200, 580, 380)],
                  96: [(460, 40, 550, 150), (480, 200, 590, 350)]}  # fmt: skip
DRIVING_BACKGROUND = [(60, 50, 300, 230), (0, 250, 90, 440)]
DRIVING_VIEW = (800, 450)
# carphone_talking.mp4 frames 0, 60, 119 viewed at 528x432 (3x, nearest) the same way: the face.
CARPHONE_FACE = [(190, 110, 300, 270)]
CARPHONE_VIEW = (528, 432)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return mediapipe_models_dir()


def _run(media: Path, models_dir: Path, out: Path, video: str, **options) -> dict:
    return preprocess_animate_job(media / video, media / "animate_character.jpg", out, models_dir=models_dir,
                                  pose_variant="full", **options)  # fmt: skip


@pytest.fixture(scope="session")
def animation(media: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("animation")
    return _run(media, models_dir, out, "animate_driving.mp4", mode="animation", fps=5, resolution_area=(640, 360))


@pytest.fixture(scope="session")
def replacement(media: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("replacement")
    return _run(media, models_dir, out, "animate_driving.mp4", mode="replacement", fps=5, resolution_area=(640, 360))


@pytest.fixture(scope="session")
def carphone(media: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("carphone")
    return _run(media, models_dir, out, "carphone_talking.mp4", mode="replacement", fps=5, resolution_area=(352, 288))


def _video(path: str) -> tuple[list[np.ndarray], Fraction]:
    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
    return decode_all(Path(path)), rate


def _check_video(path: str, count: int, size: tuple[int, int], fps: float) -> list[np.ndarray]:
    frames, rate = _video(path)
    assert len(frames) == count, f"{path}: {len(frames)} frames, expected {count}"
    assert frames[0].shape == (size[1], size[0], 3), f"{path}: {frames[0].shape}, expected {size}"
    assert float(rate) == pytest.approx(fps, rel=1e-3), f"{path}: {rate} fps, expected {fps}"
    return frames


def test_animation_files_have_the_documented_sizes_fps_and_counts(animation: dict, media: Path) -> None:
    # 106 frames at 30 fps resampled to 5 fps: int(106 / 30 * 5) = 17. The 1280x720 character at an area of
    # 640*360 gives h = floor16(sqrt(230400 / (16/9))) = 352, w = floor16(230400 / 360) = 640.
    assert (animation["frames"], animation["width"], animation["height"]) == (17, 640, 352)
    _check_video(animation["files"]["pose"], 17, (640, 352), 5)
    _check_video(animation["files"]["face"], 17, (512, 512), 5)
    _check_video(animation["files"]["preview"], 17, (960, 540), 5)
    assert "bg" not in animation["files"] and "mask" not in animation["files"]
    reference = cv2.imread(str(media / "animate_character.jpg"))
    assert np.array_equal(cv2.imread(animation["files"]["ref"]), reference)  # same pixels the generator would read
    stats = json.loads(Path(animation["files"]["stats"]).read_text())
    assert stats["frames"] == 17 and stats["fps"] == 5 and stats["source"]["frames"] == 106


def test_animation_pose_letterboxes_the_driving_canvas(animation: dict) -> None:
    # The 1920x1080 pose canvas letterboxed into 640x352 is height-bound: int(352 / 1080 * 1920) = 625 px wide,
    # centred with black bars of int((640 - 625) / 2) = 7 px; the skeleton is drawn inside.
    frames, _ = _video(animation["files"]["pose"])
    assert max(int(frame[:, :6].max()) for frame in frames) <= 16  # codec noise only
    assert all(frame.max() > 100 for frame in frames)  # a skeleton in every frame


def test_pose_is_found_in_at_least_95_percent_of_driving_frames(animation: dict, replacement: dict) -> None:
    for run in (animation, replacement):
        assert run["frames_without_pose"] <= 0.05 * run["frames"], run


def test_every_face_crop_is_512_and_shows_the_face(animation: dict, models_dir: Path) -> None:
    frames, _ = _video(animation["files"]["face"])
    with DetectorProcess(find_models(models_dir, "full"), segment=False) as detector:
        for frame in frames[::4]:
            assert frame.shape == (512, 512, 3)
            found = detector.detect_image(frame, "face crop")
            assert found.face is not None, "no face in the face crop"
            centre = found.face.mean(axis=0)
            assert 0.25 < centre[0] < 0.75 and 0.3 < centre[1] < 0.8, centre  # the face sits in the middle


def _fraction_covered(mask: np.ndarray, box: tuple[int, int, int, int], view: tuple[int, int]) -> float:
    height, width = mask.shape[:2]
    x1, y1, x2, y2 = box
    sx, sy = width / view[0], height / view[1]
    region = mask[int(y1 * sy) : int(y2 * sy), int(x1 * sx) : int(x2 * sx), 0]
    return float((region > 127).mean())


def test_replacement_mask_covers_the_person_not_the_background(replacement: dict) -> None:
    assert (replacement["width"], replacement["height"]) == (640, 352)  # the driving frames define the size
    masks = _check_video(replacement["files"]["mask"], 17, (640, 352), 5)
    backgrounds = _check_video(replacement["files"]["bg"], 17, (640, 352), 5)
    # output frame i of 5 fps shows source frame round(i * 6): source 0, 48, 96 are output 0, 8, 16
    for source, output in ((0, 0), (48, 8), (96, 16)):
        for box in DRIVING_PERSON[source]:
            assert _fraction_covered(masks[output], box, DRIVING_VIEW) > 0.99, (source, box)
            assert _fraction_covered(255 - backgrounds[output], box, DRIVING_VIEW) > 0.95  # blacked out
        for box in DRIVING_BACKGROUND:
            assert _fraction_covered(masks[output], box, DRIVING_VIEW) < 0.01, (source, box)
    values = np.unique(np.concatenate([m[..., 0].ravel() for m in masks]))
    assert set(values.tolist()) <= {0, 255}, values[:20]  # the lossless mask keeps exact 0/255


def test_carphone_replacement(carphone: dict) -> None:
    # 120 frames at 29.97 fps to 5 fps: int(120 / 29.97 * 5) = 20; 176x144 at area 352*288 -> 352x288.
    assert (carphone["frames"], carphone["width"], carphone["height"]) == (20, 352, 288)
    masks = _check_video(carphone["files"]["mask"], 20, (352, 288), 5)
    _check_video(carphone["files"]["face"], 20, (512, 512), 5)
    _check_video(carphone["files"]["pose"], 20, (352, 288), 5)
    _check_video(carphone["files"]["bg"], 20, (352, 288), 5)
    assert carphone["frames_without_pose"] <= 0.05 * 20
    for output in (0, 10, 19):  # source frames round(i * 29.97 / 5) = 0, 60, 114
        for box in CARPHONE_FACE:
            assert _fraction_covered(masks[output], box, CARPHONE_VIEW) > 0.99


@pytest.fixture(scope="session")
def retargeted(media: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    calls: list[tuple[str, int, int]] = []
    out = tmp_path_factory.mktemp("retarget")
    stats = _run(media, models_dir, out, "animate_driving.mp4", mode="animation", fps=2, resolution_area=(640, 360),
                 retarget=True, on_progress=lambda phase, done, total: calls.append((phase, done, total)))  # fmt: skip
    return stats, calls


def test_retargeted_animation_draws_on_the_character_canvas(retargeted: tuple[dict, list], animation: dict) -> None:
    stats, calls = retargeted
    assert stats["retarget"] is True and stats["frames"] == 7  # int(106 / 30 * 2)
    frames = _check_video(stats["files"]["pose"], 7, (640, 352), 2)
    assert all(frame.max() > 100 for frame in frames)
    plain = _video(animation["files"]["pose"])[0][0]  # the same source frame 0, letterboxed, not retargeted
    assert np.abs(frames[0].astype(int) - plain.astype(int)).mean() > 1.0
    assert calls[-1] == ("write", 7, 7) and ("detect", 7, 7) in calls
    done = [d for phase, d, _ in calls if phase == "detect"]
    assert done == sorted(done)


def test_small_faces_are_found_again_around_the_head(media: Path, models_dir: Path) -> None:
    # The host shrunk to a quarter (face ~60 px from hairline to chin) on a 960x540 canvas: the full-frame face
    # detector misses it, a second look at a crop around the pose's head finds it, mapped back onto the frame.
    originals = list(read_frames(media / "animate_driving.mp4", [0, 60]))
    canvases = []
    for frame in originals:
        canvas = np.zeros((540, 960, 3), np.uint8)
        canvas[270:, 240:720] = cv2.resize(frame, (480, 270), interpolation=cv2.INTER_AREA)
        canvases.append(canvas)
    with DetectorProcess(find_models(models_dir, "full"), segment=False) as detector:
        found = detector.detect_video(canvases, [0, 2000])
        for original, result in zip(originals, found, strict=True):
            assert result.face is not None and result.face_from_head_crop
            # the same face found at full size, moved to where the shrunk copy sits on the canvas
            expected = detector.detect_image(original, "original").face * [0.5, 0.5] + [0.25, 0.5]
            assert np.abs(result.face.mean(axis=0) - expected.mean(axis=0)).max() < 0.01
            assert np.ptp(result.face, axis=0) == pytest.approx(np.ptp(expected, axis=0), rel=0.15)
