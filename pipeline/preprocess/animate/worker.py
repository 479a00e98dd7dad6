"""A killable child process that owns the mediapipe tasks: batches of frames in, RawDetections out.

The parent never imports mediapipe. A batch that takes longer than its deadline or a crash kills the child and
is retried once in a fresh child; a mediapipe error also kills the child (after a graph error the next task
creation can hang) but is not retried. Either way a DetectorError says what happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

import numpy as np

from .detect import RawDetection
from .errors import DetectorError
from .models import ModelPaths

STARTUP_TIMEOUT_S = 60.0  # importing mediapipe and loading four models, on a busy 2-core machine
FRAME_TIMEOUT_S = 10.0
CHILD_MODULE = "pipeline.preprocess.animate.worker_child"
PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding the `pipeline` package  # ~30 ms per 1080p frame is normal; 10 s means something is stuck


class DetectorProcess:
    """Parent-side handle: sends frames to the child and enforces the deadlines."""

    def __init__(self, models: ModelPaths, segment: bool, frame_timeout_s: float = FRAME_TIMEOUT_S,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:  # fmt: skip
        self._models = {"pose": str(models.pose), "face": str(models.face), "hands": str(models.hands),
                        "segmenter": str(models.segmenter)}  # fmt: skip
        self._segment = segment
        self.frame_timeout_s = frame_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._fresh = True  # a fresh child still has to import mediapipe and load models
        self.restarts = 0
        self._last_timestamp = -1

    def _start(self) -> None:
        # A fresh interpreter (not fork, not multiprocessing's spawn, which re-imports the caller's __main__ and
        # is refused inside daemonic pool workers) that imports only this package.
        env = dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=os.pathsep.join(
            [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
        self._process = subprocess.Popen([sys.executable, "-m", CHILD_MODULE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, start_new_session=True)  # fmt: skip
        assert self._process.stdin is not None and self._process.stdout is not None
        self._requests = Connection(os.dup(self._process.stdin.fileno()), readable=False)
        self._replies = Connection(os.dup(self._process.stdout.fileno()), writable=False)
        self._process.stdin.close()
        self._process.stdout.close()
        self._requests.send((self._models, self._segment))
        self._fresh = True

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
        for conn in (self._requests, self._replies):
            if conn is not None:
                conn.close()
        self._process, self._requests, self._replies = None, None, None

    def _ask(self, message: tuple, frames: int) -> list[RawDetection]:
        if self._process is None:
            self._start()
        assert self._requests is not None and self._replies is not None
        deadline = frames * self.frame_timeout_s + (self.startup_timeout_s if self._fresh else 0.0)
        started = time.monotonic()
        try:
            self._requests.send(message)
            answered = self._replies.poll(deadline)
        except OSError as exc:  # the child died before reading the request
            self._kill()
            raise _Hang(f"the worker died ({type(exc).__name__})") from exc
        if not answered:
            self._kill()
            raise _Hang(f"no answer within {deadline:.1f} s for {frames} frame(s)")
        try:
            status, payload = self._replies.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            raise _Hang(f"the worker died ({type(exc).__name__}) after {time.monotonic() - started:.1f} s") from exc
        self._fresh = False
        if status == "error":
            self._kill()  # the next request gets a fresh child; the same input would fail again, so no retry
            raise _Failed(f"mediapipe failed: {payload}")
        return payload

    def _ask_with_retry(self, message: tuple, frames: int, what: str) -> list[RawDetection]:
        try:
            return self._ask(message, frames)
        except _Failed as failure:
            raise DetectorError(what, str(failure), "frames mediapipe can process (RGB uint8, non-empty)") from failure
        except _Hang as first:
            self.restarts += 1
            try:
                return self._ask(message, frames)  # a fresh child: VIDEO timestamps start anew there
            except _Hang as second:
                raise DetectorError(what, str(second), "mediapipe to finish (the worker was killed and restarted once)",
                                    f"first failure: {first}") from second

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (for logs, and for tests that kill it)."""
        return None if self._process is None else self._process.pid

    def detect_video(self, frames: list[np.ndarray], timestamps_ms: list[int]) -> list[RawDetection]:
        """Detections for consecutive frames of one video; timestamps must increase across calls."""
        if timestamps_ms and timestamps_ms[0] <= self._last_timestamp:
            raise ValueError(f"timestamps must increase: {timestamps_ms[0]} after {self._last_timestamp}")
        found = self._ask_with_retry(("video", frames, timestamps_ms), len(frames), "video frames")
        if timestamps_ms:
            self._last_timestamp = timestamps_ms[-1]
        return found

    def detect_image(self, frame: np.ndarray, what: str = "character") -> RawDetection:
        return self._ask_with_retry(("image", frame), 1, what)[0]

    def close(self) -> None:
        if self._requests is not None and self._process is not None and self._process.poll() is None:
            try:
                self._requests.send(("stop",))
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass  # killed just below either way
        self._kill()

    def __enter__(self) -> DetectorProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Hang(Exception):
    """Internal: the child did not answer (hung or died); it has already been killed."""


class _Failed(Exception):
    """Internal: mediapipe raised on this input; the child has already been killed."""
