"""What a kind's preparation function takes and gives back, and how it fails; shared by the CPU pool and the kinds.

Plain data: a preparation runs in the supervisor's CPU process pool, so nothing here may import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# progress(phase, done, total): how far a preparation is (polled by the supervisor for `wanbox status`).
Progress = Callable[[str, int, int], None]


class PreprocessFailed(Exception):
    """Preparation failed: `retryable` False for a bad input (same input, same failure)."""

    def __init__(self, message: str, kind: str = "input", retryable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:  # survive the trip back from the pool process
        return (PreprocessFailed, (str(self), self.kind, self.retryable))


@dataclass(frozen=True)
class PrepSettings:
    """The daemon's [preprocess] settings a preparation may need."""

    mediapipe_dir: Path = Path("models/mediapipe")  # the animate preprocessing's mediapipe task files
    pose_model: str = "heavy"
    max_area: int = 0  # cap on the prepared resolution area (0 = the job's own)


@dataclass(frozen=True)
class Prepared:
    """A finished preparation: the files the pool reads, by role (the run's `inputs`), and facts for people."""

    inputs: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


def capped_area(width: int, height: int, cap: int) -> tuple[int, int]:
    """The resolution area (width, height) scaled down, aspect kept, so that width * height <= cap (0: no cap)."""
    if cap <= 0 or width * height <= cap:
        return width, height
    scale = (cap / (width * height)) ** 0.5
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)
