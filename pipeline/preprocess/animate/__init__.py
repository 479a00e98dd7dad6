"""Animate-14B preprocessing with mediapipe: pose, hands and face crops, retargeting, replacement masks.

Public entry points only; nothing here imports torch (the supervisor's CPU pool must stay light).
"""

from .errors import DetectorError, ModelsMissingError, NoPersonError, PreprocessError, VideoError
from .job import preprocess_animate_job
from .models import fetch_models, find_models

__all__ = [
    "DetectorError",
    "ModelsMissingError",
    "NoPersonError",
    "PreprocessError",
    "VideoError",
    "fetch_models",
    "find_models",
    "preprocess_animate_job",
]
