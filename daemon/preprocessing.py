"""CPU preprocessing of an accepted job, run in a separate process of the supervisor's process pool.

Turns the job's original inputs in work/<id>/inbox/ into what the warm pool reads (prepared image,
pose/face/mask videos) and records them in work/<id>/prepared.json. It must not import torch, touch
the ledger or the inbox; it reports errors as PreprocessFailed with a retryable flag.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from daemon.jobfiles import PREPARED_FILE, PROGRESS_FILE


class PreprocessFailed(Exception):
    """Preparation failed: `retryable` False for a bad input (same input, same failure)."""

    def __init__(self, message: str, kind: str = "input", retryable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:  # survive the trip back from the pool process
        return (PreprocessFailed, (str(self), self.kind, self.retryable))


def max_area(params: dict[str, Any]) -> int:
    width, height = (int(v) for v in str(params["video"]["size"]).split("*"))
    return width * height


def _prepare_i2v(params: dict[str, Any], work_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    from pipeline.preprocess.image import ImageInputError, prepare_image

    source = params["inputs"]["image"]["path"]
    try:
        info = prepare_image(source, work_dir / "prepared.png", max_area(params))
    except ImageInputError as exc:
        raise PreprocessFailed(f"inputs.image: {exc}") from None
    return {"image": str(work_dir / "prepared.png")}, info


# Files of the animate preprocessing that the worker reads (preview and stats are for people).
ANIMATE_RUN_INPUTS = ("pose", "face", "ref", "bg", "mask")


class ProgressFile:
    """Progress of a running preparation, written where the supervisor polls it (at most twice a second)."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / PROGRESS_FILE
        self._last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.5 and done < total:
            return
        self._last = now
        temp = self.path.with_name(f".{self.path.name}.tmp")
        temp.write_text(json.dumps({"phase": phase, "step": done, "total": total}), encoding="utf-8")
        os.replace(temp, self.path)


def read_progress(work_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def capped_area(width: int, height: int, cap: int) -> tuple[int, int]:
    """The resolution area (width, height) scaled down, aspect kept, so that width * height <= cap (0: no cap)."""
    if cap <= 0 or width * height <= cap:
        return width, height
    scale = (cap / (width * height)) ** 0.5
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def _prepare_animate(params: dict[str, Any], work_dir: Path, models_dir: Path, pose_model: str = "heavy",
                     area_cap: int = 0) -> tuple[dict[str, str], dict[str, Any]]:
    from pipeline.preprocess.animate import PreprocessError, preprocess_animate_job
    from pipeline.preprocess.animate.errors import DetectorError

    options = params.get("animate") or {}
    width, height = capped_area(*(int(v) for v in str(params["video"]["size"]).split("*")), area_cap)
    fps = options.get("preprocess_fps", 30)
    try:
        stats = preprocess_animate_job(
            Path(params["inputs"]["video"]["path"]), Path(params["inputs"]["character"]["path"]),
            work_dir / "animate", mode=options.get("mode", "animation"), resolution_area=(width, height),
            fps=fps if fps and fps > 0 else -1, retarget=bool(options.get("retarget", False)),
            models_dir=models_dir, pose_variant=pose_model, on_progress=ProgressFile(work_dir),
        )
    except DetectorError as exc:  # the detector crashed or hung: not the input's fault, try again
        raise PreprocessFailed(f"animate preprocessing: {exc}", "internal", True) from None
    except PreprocessError as exc:
        raise PreprocessFailed(f"animate preprocessing: {exc}", "input", False) from None
    files = stats.get("files", {})
    return {role: files[role] for role in ANIMATE_RUN_INPUTS if role in files}, stats


def prepared_inputs(work_dir: Path) -> dict[str, str] | None:
    """The run inputs recorded by a finished preprocessing, if it and every file it names still exist."""
    try:
        record = json.loads((work_dir / PREPARED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    inputs = record.get("inputs")
    if not isinstance(inputs, dict) or not all(os.path.isfile(p) for p in inputs.values()):
        return None
    return inputs


def die_with(parent_pid: int) -> None:
    """Pool-process initializer: end this process when the supervisor dies, even by SIGKILL.

    The pool's processes hold their own end of the task queue, so they never see it close: without this they
    would outlive a killed supervisor (outside systemd, which kills the whole unit) and hold their memory.
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: the unit's cgroup is the only guard
        return
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os._exit(1)


def warm_up() -> None:
    """Import the image preparation in a fresh pool process, so the first job does not pay for it."""
    import pipeline.preprocess.image  # noqa: F401


def prepare_job(kind: str, params: dict[str, Any], work_dir: str, models_dir: str = "", pose_model: str = "heavy",
                area_cap: int = 0) -> dict[str, Any]:
    """Prepare one job (runs in a pool process); returns {"inputs": role -> path, "info", "seconds"}."""
    started = time.monotonic()
    work = Path(work_dir)
    try:
        if kind == "i2v":
            inputs, info = _prepare_i2v(params, work)
        elif kind == "animate":
            inputs, info = _prepare_animate(params, work, Path(models_dir), pose_model, area_cap)
        else:
            raise PreprocessFailed(f"kind = {kind!r}: expected i2v or animate")
    except PreprocessFailed:
        raise
    except (OSError, ValueError) as exc:
        raise PreprocessFailed(f"preprocessing failed: {type(exc).__name__}: {exc}", "input", False) from None
    except Exception as exc:  # a bug or resource problem, not the user's input: try again later
        raise PreprocessFailed(f"preprocessing failed: {type(exc).__name__}: {exc}", "internal", True) from None
    record = {"inputs": inputs, "info": info, "seconds": round(time.monotonic() - started, 3)}
    temp = work / f".{PREPARED_FILE}.tmp"
    temp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    os.replace(temp, work / PREPARED_FILE)  # written last: its presence means preparation finished
    return record
