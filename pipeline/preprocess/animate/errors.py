"""Errors of the animate preprocessing, each naming the field, the value seen and what was expected.

Only exception classes live here; they must not import mediapipe, cv2 or torch, so any caller can catch them.
"""

from __future__ import annotations


class PreprocessError(Exception):
    """A preprocessing failure a person can act on: `field` had `value`, but `expected` was needed."""

    def __init__(self, field: str, value: object, expected: str, hint: str = "") -> None:
        self.field = field
        self.value = value
        self.expected = expected
        self.hint = hint
        message = f"{field}: got {value!r}, expected {expected}"
        super().__init__(f"{message}. {hint}" if hint else message)


class VideoError(PreprocessError):
    """The driving video is unreadable, empty, or too short."""


class NoPersonError(PreprocessError):
    """No person was found where one is required (the driving video or the character image)."""


class ModelsMissingError(PreprocessError):
    """A mediapipe model file is missing or does not match its pinned sha256."""


class DetectorError(PreprocessError):
    """The mediapipe worker process failed, crashed or hung (it was killed)."""
