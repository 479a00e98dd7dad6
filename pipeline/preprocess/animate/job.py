"""One animate preprocessing job: driving video + character image -> src_pose/src_face/src_ref (+ bg, mask).

Orchestrates probing, detection in the killable worker, gap filling, retargeting, rendering and writing;
the CPU pool calls prepare_animate_job (the kind's preparation). No torch here, and mediapipe only runs inside the
worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from inbox_schema import Job
from inbox_schema.kinds.animate import MODES
from pipeline.preprocess.contract import Prepared, PreprocessFailed, PrepSettings, Progress, capped_area

from . import geometry, mask, render, skeleton
from .detect import RawDetection
from .errors import DetectorError, NoPersonError, PreprocessError, VideoError
from .models import find_models
from .retarget import retarget as retarget_poses
from .skeleton import Pose
from .video_io import MASK_CRF, VideoInfo, VideoWriter, probe_video, read_frames
from .worker import FRAME_TIMEOUT_S, DetectorProcess

MIN_FRAMES = 2  # the generator's reflection padding fails on a single frame
BATCH_FRAMES = 8
PREVIEW_MAX_SIDE = 960
# Mediapipe resizes every input to a few hundred pixels internally, so larger frames only cost time (copying
# to the worker, colour conversion); landmarks are normalised and mapped back onto the full frame.
DETECT_MAX_SIDE = 960


@dataclass
class Findings:
    """Per-frame results of the detection pass, before gaps are filled."""

    poses: list[Pose | None] = field(default_factory=list)
    faces: list[np.ndarray | None] = field(default_factory=list)  # (68, 2) pixels from the face mesh
    persons: list[bytes | None] = field(default_factory=list)  # PNG of the binary segmentation (~1 KB a frame)
    hands_found: int = 0
    faces_from_head_crop: int = 0


@dataclass
class Plan:
    """Sizes and frame indices decided before any detection."""

    info: VideoInfo
    fps: float
    indices: list[int]
    out_w: int
    out_h: int
    frame_w: int  # size of the frames detection runs on (original in animation, resized in replacement)
    frame_h: int


def _check_options(mode: str, resolution_area: tuple[int, int], fps: float, retarget: bool) -> None:
    if mode not in MODES:
        raise PreprocessError("mode", mode, f"one of {', '.join(MODES)}")
    if len(resolution_area) != 2 or min(resolution_area) <= 0:
        raise PreprocessError("resolution_area", resolution_area, "two positive integers W H, e.g. 1280 720")
    if fps != -1 and fps <= 0:
        raise PreprocessError("fps", fps, "a positive frame rate, or -1 for the source's")
    if retarget and mode != "animation":
        raise PreprocessError("retarget", retarget, "false in replacement mode (retargeting exists for animation only)")


def read_character(path: Path) -> np.ndarray:
    """The character image as RGB (cv2.imread, as the generator reads src_ref.png)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if image is None:
        raise PreprocessError("character", str(path), "a readable image file (jpg, png, webp, bmp)")
    return image[:, :, ::-1].copy()


def make_plan(info: VideoInfo, character: np.ndarray, mode: str, resolution_area: tuple[int, int], fps: float) -> Plan:
    out_fps = info.fps if fps == -1 else float(fps)
    indices = geometry.sample_indices(info.frames, info.fps, out_fps)
    if len(indices) < MIN_FRAMES:
        raise VideoError("video", f"{info.frames} frame(s) at {info.fps:g} fps = {len(indices)} frame(s) at {out_fps:g} fps",
                         f"at least {MIN_FRAMES} frames after resampling", "use a longer video or a higher --fps")  # fmt: skip
    area = resolution_area[0] * resolution_area[1]
    if mode == "animation":
        out_w, out_h = geometry.size_by_area(character.shape[1], character.shape[0], area)
        frame_w, frame_h = info.width, info.height
    else:
        out_w, out_h = geometry.size_by_area(info.width, info.height, area)
        frame_w, frame_h = out_w, out_h
    if min(out_w, out_h) < geometry.DIVISOR:
        raise PreprocessError("resolution_area", resolution_area, "an area large enough for both sides to be >= 16 px")
    return Plan(info, out_fps, indices, out_w, out_h, frame_w, frame_h)


def _detection_frames(video: Path, plan: Plan, mode: str) -> Iterator[np.ndarray]:
    for frame in read_frames(video, plan.indices):
        yield geometry.fit_to_size(frame, plan.out_w, plan.out_h) if mode == "replacement" else frame


def _timestamps(start: int, count: int, fps: float) -> list[int]:
    stamps, last = [], -1
    for i in range(start, start + count):
        last = max(last + 1, int(round(i * 1000.0 / fps)))  # VIDEO mode needs strictly increasing stamps
        stamps.append(last)
    return stamps


def _record(findings: Findings, found: RawDetection, width: int, height: int) -> None:
    pose = None
    if found.body is not None:
        body = skeleton.body_from_landmarks(found.body, width, height)
        left, right = skeleton.hands_from_landmarks(found.hands, body, width, height)
        pose = Pose(body, left, right, width, height)
        findings.hands_found += bool(found.hands)
    findings.poses.append(pose)
    findings.faces.append(None if found.face is None else skeleton.face68_from_mesh(found.face, width, height))
    findings.faces_from_head_crop += found.face_from_head_crop
    person = found.person_mask
    if person is not None and person.shape != (height, width):
        person = cv2.resize(person, (width, height), interpolation=cv2.INTER_LINEAR)
    findings.persons.append(None if person is None else _png((person >= mask.PERSON_THRESHOLD).astype(np.uint8)))


def _png(binary: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", binary)
    assert ok, "PNG encoding of a uint8 mask cannot fail"
    return encoded.tobytes()


def for_detection(frame: np.ndarray) -> np.ndarray:
    """The frame shrunk so that its longer side is at most DETECT_MAX_SIDE."""
    height, width = frame.shape[:2]
    scale = DETECT_MAX_SIDE / max(height, width)
    if scale >= 1:
        return frame
    return cv2.resize(frame, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def detect_video(detector: DetectorProcess, video: Path, plan: Plan, mode: str, progress: Progress) -> Findings:
    findings, batch = Findings(), []
    total = len(plan.indices)

    def flush() -> None:
        stamps = _timestamps(len(findings.poses), len(batch), plan.fps)
        for found in detector.detect_video(batch, stamps):
            _record(findings, found, plan.frame_w, plan.frame_h)
        batch.clear()
        progress("detect", len(findings.poses), total)

    for frame in _detection_frames(video, plan, mode):
        batch.append(for_detection(frame))
        if len(batch) == BATCH_FRAMES:
            flush()
    if batch:
        flush()
    return findings


def fill_gaps(items: list, what: str, video: Path) -> list:
    """Frames with nothing found reuse the last good item (the first good one for leading frames)."""
    first = next((item for item in items if item is not None), None)
    if first is None:
        raise NoPersonError("video", str(video), f"a person visible in at least one frame (no {what} in any of "
                            f"{len(items)} frames)", "check that the video shows a person")  # fmt: skip
    filled, last = [], first
    for item in items:
        last = item if item is not None else last
        filled.append(last)
    return filled


def face_outlines(findings: Findings, poses: list[Pose]) -> list[np.ndarray | None]:
    """Face mesh outline per frame, else one from the frame's own head points (nose, eyes, ears)."""
    outlines = []
    for face, own_pose, pose in zip(findings.faces, findings.poses, poses, strict=True):
        if face is None and own_pose is not None:
            face = skeleton.face_points_from_head(pose.body)
        outlines.append(face)
    return outlines


def character_pose(detector: DetectorProcess, image: np.ndarray, path: Path) -> Pose | None:
    """The character's pose; NoPersonError when mediapipe sees neither a body nor a face in the image."""
    found = detector.detect_image(for_detection(image))
    if found.body is None and found.face is None:
        raise NoPersonError("character", str(path), "an image showing a person (mediapipe found no body and no face)",
                            "use a picture where the character's body or face is clearly visible")  # fmt: skip
    if found.body is None:
        return None
    height, width = image.shape[:2]
    body = skeleton.body_from_landmarks(found.body, width, height)
    left, right = skeleton.hands_from_landmarks(found.hands, body, width, height)
    return Pose(body, left, right, width, height)


def pose_frame(pose: Pose, plan: Plan, retargeted: bool) -> np.ndarray:
    """One src_pose frame: drawn on the driving-frame canvas and letterboxed (animation), or drawn directly at
    the output size (retargeted animation, replacement)."""
    picture = render.render_pose(pose)
    if retargeted or (pose.width, pose.height) == (plan.out_w, plan.out_h):
        return picture
    return geometry.padding_resize(picture, plan.out_h, plan.out_w)


def _preview_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


class Outputs:
    """The mp4 writers of one job."""

    def __init__(self, out_dir: Path, plan: Plan, mode: str) -> None:
        preview_w, preview_h = _preview_size(plan.frame_w, plan.frame_h)
        self.preview_size = (preview_w, preview_h)
        self.files = {
            "pose": VideoWriter(out_dir / "src_pose.mp4", plan.fps, plan.out_w, plan.out_h),
            "face": VideoWriter(out_dir / "src_face.mp4", plan.fps, geometry.FACE_CROP_SIZE, geometry.FACE_CROP_SIZE),
            "preview": VideoWriter(out_dir / "preview.mp4", plan.fps, preview_w, preview_h),
        }
        if mode == "replacement":
            self.files["bg"] = VideoWriter(out_dir / "src_bg.mp4", plan.fps, plan.out_w, plan.out_h)
            self.files["mask"] = VideoWriter(out_dir / "src_mask.mp4", plan.fps, plan.out_w, plan.out_h, crf=MASK_CRF)

    def close(self) -> dict[str, str]:
        for writer in self.files.values():
            writer.close()
        return {name: str(writer.path) for name, writer in self.files.items()}


def character_region(segmentation: bytes | None, pose: Pose, shape: tuple[int, int]) -> np.ndarray:
    """The final replacement mask of one frame: segmentation kept where the pose is, else the pose hull."""
    person = None
    if segmentation is not None:
        binary = cv2.imdecode(np.frombuffer(segmentation, np.uint8), cv2.IMREAD_GRAYSCALE)
        person = mask.person_mask(binary * 255, pose)
    if person is None or not person.any():
        person = mask.pose_hull_mask(pose, shape)
    return mask.character_mask(person)


def write_videos(video: Path, out_dir: Path, plan: Plan, mode: str, drawn: list[Pose], poses: list[Pose],
                 faces: list[np.ndarray], findings: Findings, retargeted: bool, progress: Progress) -> dict[str, str]:  # fmt: skip
    outputs = Outputs(out_dir, plan, mode)
    try:
        for i, frame in enumerate(_detection_frames(video, plan, mode)):
            box = geometry.face_crop_box(faces[i], plan.frame_w, plan.frame_h)
            outputs.files["face"].write(geometry.crop_face(frame, box))
            outputs.files["pose"].write(pose_frame(drawn[i], plan, retargeted))
            preview = render.draw_preview(frame, poses[i], box)
            outputs.files["preview"].write(cv2.resize(preview, outputs.preview_size, interpolation=cv2.INTER_AREA))
            if mode == "replacement":
                region = character_region(findings.persons[i], poses[i], frame.shape[:2])
                outputs.files["mask"].write(mask.mask_frame(region))
                outputs.files["bg"].write(mask.background(frame, region))
            progress("write", i + 1, len(plan.indices))
    finally:
        files = outputs.close()
    return files


def preprocess_animate_job(
    video: Path,
    character: Path,
    out_dir: Path,
    *,
    mode: str,
    resolution_area: tuple[int, int] = (1280, 720),
    fps: float = 30,
    retarget: bool = False,
    models_dir: Path,
    pose_variant: str = "heavy",
    on_progress: Progress | None = None,
    frame_timeout_s: float = FRAME_TIMEOUT_S,
) -> dict:
    """Write src_pose.mp4, src_face.mp4, src_ref.png, preview.mp4 (+ src_bg.mp4, src_mask.mp4 in replacement
    mode) and preprocess_stats.json into out_dir; return the stats with the produced file paths."""
    progress = on_progress or (lambda phase, done, total: None)
    video, character, out_dir = Path(video), Path(character), Path(out_dir)
    _check_options(mode, tuple(resolution_area), fps, retarget)
    timings: dict[str, float] = {}
    started = time.monotonic()
    models = find_models(Path(models_dir), pose_variant)
    reference = read_character(character)
    info = probe_video(video)
    plan = make_plan(info, reference, mode, tuple(resolution_area), fps)
    timings["probe_s"] = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)

    mark = time.monotonic()
    with DetectorProcess(models, segment=mode == "replacement", frame_timeout_s=frame_timeout_s) as detector:
        if mode == "animation":
            resized_reference = geometry.fit_to_size(reference, plan.out_w, plan.out_h)
            target_pose = character_pose(detector, resized_reference, character)
        else:
            target_pose = character_pose(detector, reference, character)
        findings = detect_video(detector, video, plan, mode, progress)
        restarts = detector.restarts
    timings["detect_s"] = time.monotonic() - mark

    poses = fill_gaps(findings.poses, "body pose", video)
    faces = fill_gaps(face_outlines(findings, poses), "face", video)
    drawn = poses
    retargeted = retarget and target_pose is not None
    if retargeted:
        drawn = retarget_poses(poses[0], target_pose, poses)

    mark = time.monotonic()
    files = write_videos(video, out_dir, plan, mode, drawn, poses, faces, findings, retargeted, progress)
    # The reference byte-copies the input (a JPEG may end up named .png); a real PNG of the decoded pixels gives
    # the generator's cv2.imread exactly the same image (EXIF orientation already applied) under an honest name.
    cv2.imwrite(str(out_dir / "src_ref.png"), reference[:, :, ::-1])
    files["ref"] = str(out_dir / "src_ref.png")
    timings["write_s"] = time.monotonic() - mark
    timings["total_s"] = time.monotonic() - started

    stats = {
        "mode": mode,
        "retarget": retargeted,
        "retarget_requested": retarget,
        "pose_variant": pose_variant,
        "source": {"width": info.width, "height": info.height, "fps": info.fps, "frames": info.frames},
        "width": plan.out_w,
        "height": plan.out_h,
        "fps": plan.fps,
        "frames": len(plan.indices),
        "frames_without_pose": sum(p is None for p in findings.poses),
        "frames_without_face": sum(f is None for f in findings.faces),
        "frames_with_hands": findings.hands_found,
        "faces_found_in_head_crop": findings.faces_from_head_crop,
        "detector_restarts": restarts,
        "timings": {name: round(value, 3) for name, value in timings.items()},
        "frames_per_second": round(len(plan.indices) / max(timings["total_s"], 1e-9), 2),
        "files": files,
    }
    (out_dir / "preprocess_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    stats["files"]["stats"] = str(out_dir / "preprocess_stats.json")
    return stats


# Files of the preprocessing that the pool reads (the preview and the stats are for people).
RUN_INPUTS = ("pose", "face", "ref", "bg", "mask")


def prepare_animate_job(job: Job, work_dir: Path, settings: PrepSettings, progress: Progress) -> Prepared:
    """The `animate` kind's preparation (its registry entry names it): pose, face, mask and background videos."""
    options = job.options
    width, height = capped_area(job.video.width, job.video.height, settings.max_area)
    try:
        stats = preprocess_animate_job(
            job.inputs["video"].path, job.inputs["character"].path, work_dir / "animate", mode=options.mode,
            resolution_area=(width, height), fps=options.preprocess_fps, retarget=options.retarget,
            models_dir=settings.mediapipe_dir, pose_variant=settings.pose_model, on_progress=progress,
        )
    except DetectorError as exc:  # the detector crashed or hung: not the input's fault, try again
        raise PreprocessFailed(f"animate preprocessing: {exc}", "internal", True) from None
    except PreprocessError as exc:
        raise PreprocessFailed(f"animate preprocessing: {exc}", "input", False) from None
    files = stats.get("files", {})
    return Prepared({role: files[role] for role in RUN_INPUTS if role in files}, stats)
