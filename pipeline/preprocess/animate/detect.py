"""Runs mediapipe's Tasks (pose, hands, face mesh, person segmentation) on RGB frames; used inside the worker.

Returns plain numpy arrays (picklable); it must only run in the killable worker process, never in the
supervisor, because a mediapipe graph error can leave the next task creation hanging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

MIN_POSE_CONFIDENCE = 0.5
MIN_HAND_CONFIDENCE = 0.5
MIN_FACE_CONFIDENCE = 0.5
HEAD_POINTS = slice(0, 11)  # mediapipe pose: nose, eyes (inner, centre, outer), ears, mouth corners
HEAD_CROP_SCALE = 3.0  # the head crop is 3x the extent of the head points: the face fills about a third
HEAD_CROP_SIZE = 256
MIN_HEAD_CROP = 24  # pixels


@dataclass
class RawDetection:
    """What mediapipe found in one frame, in normalised [0, 1] image coordinates."""

    body: np.ndarray | None = None  # (33, 4): x, y, visibility, presence
    hands: list[tuple[np.ndarray, float]] = field(default_factory=list)  # ((21, 2) points, handedness score)
    face: np.ndarray | None = None  # (478, 2)
    face_from_head_crop: bool = False  # found only by looking again around the pose's head
    person_mask: np.ndarray | None = None  # (H, W) uint8 0..255 person confidence


class Detector:
    """The four mediapipe tasks in one running mode (VIDEO for the driving video, IMAGE for the character)."""

    def __init__(self, models: dict[str, str], video: bool, segment: bool) -> None:
        from mediapipe.tasks.python import BaseOptions, vision

        mode = vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE
        self._video = video
        self._models = models
        self._head_face: Any = None
        self._tasks = []
        self._pose = self._add(vision.PoseLandmarker.create_from_options(vision.PoseLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=models["pose"]), running_mode=mode, num_poses=1,
            min_pose_detection_confidence=MIN_POSE_CONFIDENCE)))  # fmt: skip
        self._hands = self._add(vision.HandLandmarker.create_from_options(vision.HandLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=models["hands"]), running_mode=mode, num_hands=2,
            min_hand_detection_confidence=MIN_HAND_CONFIDENCE)))  # fmt: skip
        self._face = self._add(vision.FaceLandmarker.create_from_options(vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=models["face"]), running_mode=mode, num_faces=1,
            min_face_detection_confidence=MIN_FACE_CONFIDENCE)))  # fmt: skip
        self._segmenter = None
        if segment:
            self._segmenter = self._add(vision.ImageSegmenter.create_from_options(vision.ImageSegmenterOptions(
                base_options=BaseOptions(model_asset_path=models["segmenter"]), running_mode=mode,
                output_confidence_masks=True, output_category_mask=False)))  # fmt: skip

    def _add(self, task: Any) -> Any:  # mediapipe's task classes share no base type worth naming
        self._tasks.append(task)
        return task

    def _run(self, task: Any, image: Any, timestamp_ms: int) -> Any:
        return task.detect_for_video(image, timestamp_ms) if self._video else task.detect(image)

    def detect(self, rgb: np.ndarray, timestamp_ms: int = 0) -> RawDetection:
        import mediapipe as mp

        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        found = RawDetection()
        pose = self._run(self._pose, image, timestamp_ms)
        if pose.pose_landmarks:
            found.body = np.array([[p.x, p.y, p.visibility or 0.0, p.presence or 0.0] for p in pose.pose_landmarks[0]])
        hands = self._run(self._hands, image, timestamp_ms)
        for points, handedness in zip(hands.hand_landmarks, hands.handedness, strict=True):
            found.hands.append((np.array([[p.x, p.y] for p in points]), float(handedness[0].score)))
        face = self._run(self._face, image, timestamp_ms)
        if face.face_landmarks:
            found.face = np.array([[p.x, p.y] for p in face.face_landmarks[0]])
        elif found.body is not None:
            found.face = self._face_in_head_crop(rgb, found.body)
            found.face_from_head_crop = found.face is not None
        if self._segmenter is not None:
            found.person_mask = self._person_mask(image, timestamp_ms)
        return found

    def _face_in_head_crop(self, rgb: np.ndarray, body: np.ndarray) -> np.ndarray | None:
        """Small faces (under ~40 px) escape the full-frame face detector; a crop around the pose's head points,
        enlarged to 256 px, usually shows the face big enough. Landmarks are mapped back to the frame."""
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        height, width = rgb.shape[:2]
        head = body[HEAD_POINTS, :2] * np.array([width, height])
        side = max(float(np.ptp(head, axis=0).max()) * HEAD_CROP_SCALE, MIN_HEAD_CROP)
        x0, y0 = head.mean(axis=0) - side / 2
        zoom = HEAD_CROP_SIZE / side
        warp = np.array([[zoom, 0.0, -x0 * zoom], [0.0, zoom, -y0 * zoom]])
        crop = cv2.warpAffine(rgb, warp, (HEAD_CROP_SIZE, HEAD_CROP_SIZE), flags=cv2.INTER_LINEAR)
        if self._head_face is None:  # IMAGE mode: crops of consecutive frames are not a video
            self._head_face = self._add(vision.FaceLandmarker.create_from_options(vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=self._models["face"]), num_faces=1,
                running_mode=vision.RunningMode.IMAGE, min_face_detection_confidence=MIN_FACE_CONFIDENCE)))  # fmt: skip
        result = self._head_face.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(crop)))
        if not result.face_landmarks:
            return None
        points = np.array([[p.x, p.y] for p in result.face_landmarks[0]]) * HEAD_CROP_SIZE / zoom + [x0, y0]
        return points / np.array([width, height])

    def _person_mask(self, image: Any, timestamp_ms: int) -> np.ndarray:
        if self._video:
            result = self._segmenter.segment_for_video(image, timestamp_ms)
        else:
            result = self._segmenter.segment(image)
        # selfie_segmenter has one output: the person confidence (the last mask if a model gives several)
        confidence = result.confidence_masks[-1].numpy_view()
        return np.clip(np.asarray(confidence).reshape(image.height, image.width) * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def close(self) -> None:
        for task in self._tasks:
            task.close()
        self._tasks = []
