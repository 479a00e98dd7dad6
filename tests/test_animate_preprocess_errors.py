"""Bad inputs and failures of the animate preprocessing: precise errors, never a hang.

Real files (empty, corrupt, one frame, a landscape with nobody), real model files, a real worker process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mediapipe_models import mediapipe_models_dir  # noqa: E402

from pipeline.preprocess.animate import (  # noqa: E402
    DetectorError,
    ModelsMissingError,
    NoPersonError,
    PreprocessError,
    VideoError,
    fetch_models,
    find_models,
    preprocess_animate_job,
)
from pipeline.preprocess.animate.cli import add_arguments  # noqa: E402
from pipeline.preprocess.animate.video_io import VideoWriter  # noqa: E402
from pipeline.preprocess.animate.worker import DetectorProcess  # noqa: E402

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return mediapipe_models_dir()


def landscape(width: int = 320, height: int = 240, shift: int = 0) -> np.ndarray:
    """An RGB picture with nobody in it: sky gradient, sun, green hills."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 2] = np.linspace(255, 150, height, dtype=np.uint8)[:, None]
    image[..., 1] = np.linspace(200, 120, height, dtype=np.uint8)[:, None]
    image[..., 0] = 90
    cv2.circle(image, (width // 4 + shift, height // 4), height // 10, (255, 230, 80), -1)
    hills = np.array([[0, height], [0, height * 2 // 3], [width // 3, height // 2], [width * 2 // 3, height * 3 // 4],
                      [width, height // 2], [width, height]], np.int32)  # fmt: skip
    cv2.fillPoly(image, [hills], (40, 140, 50))
    return image


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10) -> Path:
    height, width = frames[0].shape[:2]
    with VideoWriter(path, fps, width, height) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def run(video: Path, character: Path, out: Path, models_dir: Path, **options) -> dict:
    options.setdefault("mode", "animation")
    return preprocess_animate_job(video, character, out, models_dir=models_dir, pose_variant="full", **options)


def test_zero_length_video(tmp_path: Path, media: Path, models_dir: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="0 bytes") as error:
        run(empty, media / "animate_character.jpg", tmp_path / "out", models_dir)
    assert error.value.field == "video" and error.value.value == str(empty)


def test_corrupt_video(tmp_path: Path, media: Path, models_dir: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="readable video file|decodable") as error:
        run(corrupt, media / "animate_character.jpg", tmp_path / "out", models_dir)
    assert error.value.field == "video"


def test_truncated_video_keeps_its_decodable_frames_or_fails_precisely(tmp_path: Path, media: Path, models_dir: Path) -> None:
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((media / "carphone_talking.mp4").read_bytes()[:20_000])  # header survives, data cut
    with pytest.raises(VideoError) as error:
        run(truncated, media / "animate_character.jpg", tmp_path / "out", models_dir)
    assert error.value.field == "video"


def test_one_frame_video_is_too_short(tmp_path: Path, media: Path, models_dir: Path) -> None:
    video = write_video(tmp_path / "one.mp4", [landscape()], fps=10)
    with pytest.raises(VideoError, match="at least 2 frames") as error:
        run(video, media / "animate_character.jpg", tmp_path / "out", models_dir, fps=10)
    assert "1 frame(s)" in str(error.value)


def test_video_without_a_person(tmp_path: Path, media: Path, models_dir: Path) -> None:
    video = write_video(tmp_path / "nobody.mp4", [landscape(shift=i * 4) for i in range(6)])
    started = time.monotonic()
    with pytest.raises(NoPersonError, match="no body pose in any of 6 frames") as error:
        run(video, media / "animate_character.jpg", tmp_path / "out", models_dir, fps=10)
    assert error.value.field == "video"
    assert time.monotonic() - started < 100


def test_character_without_a_person(tmp_path: Path, media: Path, models_dir: Path) -> None:
    character = tmp_path / "hills.png"
    cv2.imwrite(str(character), landscape(640, 360)[:, :, ::-1])
    with pytest.raises(NoPersonError, match="an image showing a person") as error:
        run(media / "carphone_talking.mp4", character, tmp_path / "out", models_dir, mode="replacement")
    assert error.value.field == "character" and error.value.value == str(character)


def test_unreadable_character(tmp_path: Path, media: Path, models_dir: Path) -> None:
    character = tmp_path / "notes.jpg"
    character.write_text("not a picture")
    with pytest.raises(PreprocessError, match="readable image file") as error:
        run(media / "carphone_talking.mp4", character, tmp_path / "out", models_dir)
    assert error.value.field == "character"


@pytest.mark.parametrize(
    ("options", "field"),
    [({"mode": "dance"}, "mode"), ({"mode": "replacement", "retarget": True}, "retarget"),
     ({"fps": 0}, "fps"), ({"resolution_area": (0, 720)}, "resolution_area"),
     ({"resolution_area": (8, 8)}, "resolution_area")],
)  # fmt: skip
def test_bad_options_name_the_field(tmp_path: Path, media: Path, models_dir: Path, options: dict, field: str) -> None:
    with pytest.raises(PreprocessError) as error:
        run(media / "carphone_talking.mp4", media / "animate_character.jpg", tmp_path / "out", models_dir, **options)
    assert error.value.field == field


def test_missing_models_name_the_file_and_how_to_get_it(tmp_path: Path, models_dir: Path) -> None:
    with pytest.raises(ModelsMissingError, match="pose_landmarker_heavy.task") as error:
        find_models(tmp_path, "heavy")
    assert "wanbox models pull animate-14B" in str(error.value)
    assert "storage.googleapis.com/mediapipe-models" in str(error.value)
    shutil.copy(models_dir / "pose_landmarker_full.task", tmp_path)
    with pytest.raises(ModelsMissingError, match="face_landmarker.task"):
        find_models(tmp_path, "full")
    with pytest.raises(ModelsMissingError, match="pose_variant"):
        find_models(models_dir, "lite")


def test_models_are_verified_and_not_fetched_again(tmp_path: Path, models_dir: Path) -> None:
    names = ("pose_landmarker_full.task", "face_landmarker.task", "hand_landmarker.task", "selfie_segmenter.tflite")
    for name in names:
        shutil.copy(models_dir / name, tmp_path)
    assert find_models(tmp_path, "full", verify=True).pose == tmp_path / "pose_landmarker_full.task"
    (tmp_path / "models").mkdir()
    shutil.copytree(tmp_path, tmp_path / "models" / "mediapipe", ignore=shutil.ignore_patterns("models"))
    nested = find_models(tmp_path / "models", "full")  # the checkpoints folder with mediapipe/ inside
    assert nested.face == tmp_path / "models" / "mediapipe" / "face_landmarker.task"
    # verified files already present: no download is attempted (this test runs offline)
    assert fetch_models(tmp_path, names) == [tmp_path / name for name in names]
    (tmp_path / "hand_landmarker.task").write_bytes(b"changed")
    with pytest.raises(ModelsMissingError, match="sha256"):
        find_models(tmp_path, "full", verify=True)


def test_fetch_downloads_verifies_and_never_leaves_partial_files(tmp_path: Path, models_dir: Path) -> None:
    mirror = models_dir.resolve().as_uri()  # a file:// mirror: the same code path as HTTPS, offline
    dest = tmp_path / "dest"
    assert fetch_models(dest, ("face_landmarker.task",), mirror=mirror) == [dest / "face_landmarker.task"]
    assert (dest / "face_landmarker.task").read_bytes() == (models_dir / "face_landmarker.task").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hand_landmarker.task").write_bytes(b"not the model")
    with pytest.raises(ModelsMissingError, match="sha256"):
        fetch_models(dest, ("hand_landmarker.task",), mirror=bad.as_uri())
    with pytest.raises(ModelsMissingError, match="reachable download location"):
        fetch_models(dest, ("selfie_segmenter.tflite",), mirror=(tmp_path / "nowhere").as_uri())
    assert sorted(p.name for p in dest.iterdir()) == ["face_landmarker.task"]  # no .part files left


def test_hung_worker_is_killed_and_reported(models_dir: Path) -> None:
    # deadlines far below what starting mediapipe takes: both attempts time out, each child is killed
    detector = DetectorProcess(find_models(models_dir, "full"), segment=False, frame_timeout_s=0.05,
                               startup_timeout_s=0.05)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(DetectorError, match="no answer within") as error:
        detector.detect_image(landscape())
    assert time.monotonic() - started < 30
    assert error.value.field == "character" and detector.restarts == 1 and detector.pid is None


def test_crashed_worker_is_restarted_and_a_mediapipe_error_kills_it(models_dir: Path) -> None:
    with DetectorProcess(find_models(models_dir, "full"), segment=False) as detector:
        assert detector.detect_image(landscape()).body is None
        first = detector.pid
        os.kill(first, signal.SIGKILL)
        assert detector.detect_image(landscape()).body is None  # answered by a fresh child
        assert detector.restarts == 1 and detector.pid != first
        with pytest.raises(DetectorError, match="mediapipe failed") as error:
            detector.detect_image(np.zeros((0, 0, 3), np.uint8), "frame")  # an empty picture
        assert error.value.field == "frame" and detector.pid is None  # killed, not reused
        assert detector.detect_image(landscape()).face is None  # the next request gets a fresh child


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # exited; only waiting for a reaper


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_worker_does_not_outlive_a_killed_parent(models_dir: Path) -> None:
    code = ("import sys, time, numpy as np\n"
            "from pathlib import Path\n"
            "from pipeline.preprocess.animate.models import find_models\n"
            "from pipeline.preprocess.animate.worker import DetectorProcess\n"
            "d = DetectorProcess(find_models(Path(sys.argv[1]), 'full'), segment=False)\n"
            "d.detect_image(np.zeros((64, 64, 3), np.uint8))\n"
            "print(d.pid, flush=True)\n"
            "time.sleep(120)\n")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code, str(models_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(child), "the mediapipe worker outlived its parent"
    finally:
        parent.kill()


def test_cli_reports_a_precise_error(tmp_path: Path, media: Path) -> None:
    command = [sys.executable, "-m", "pipeline.preprocess.animate", "--mode", "animation",
               "--video", str(media / "carphone_talking.mp4"), "--character", str(media / "animate_character.jpg"),
               "--out", str(tmp_path / "out"), "--models-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "error: models_dir/pose_landmarker_heavy.task" in result.stderr


def test_cli_runs_a_job_and_prints_what_it_wrote(tmp_path: Path, media: Path, models_dir: Path) -> None:
    command = [sys.executable, "-m", "pipeline.preprocess.animate", "--mode", "replacement",
               "--video", str(media / "carphone_talking.mp4"), "--character", str(media / "animate_character.jpg"),
               "--out", str(tmp_path / "out"), "--models-dir", str(models_dir), "--pose-model", "full",
               "--fps", "2", "--resolution-area", "176", "144"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("src_pose.mp4", "src_face.mp4", "src_ref.png", "src_bg.mp4", "src_mask.mp4", "preview.mp4"):
        assert f"{tmp_path / 'out' / name}" in result.stdout and (tmp_path / "out" / name).stat().st_size > 0
    assert '"frames": 8' in result.stdout  # int(120 / 29.97 * 2)
    assert "write: 8/8 frames" in result.stderr


def test_cli_arguments() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--mode", "replacement", "--video", "v.mp4", "--character", "c.png", "--out", "o",
                              "--resolution-area", "832", "480", "--fps", "-1", "--pose-model", "full"])  # fmt: skip
    assert (args.mode, args.resolution_area, args.fps, args.pose_model, args.retarget) == (
        "replacement", [832, 480], -1, "full", False)  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "dance", "--video", "v", "--character", "c", "--out", "o"])


def test_the_package_stays_light_for_the_supervisor_pool() -> None:
    # the CPU pool imports this package: neither torch nor mediapipe may come with it (mediapipe lives in the
    # killable worker only)
    code = "import sys, pipeline.preprocess.animate; print('torch' in sys.modules, 'mediapipe' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"], result.stderr
