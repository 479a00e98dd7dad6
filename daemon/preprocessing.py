"""The CPU pool's side of preparing an accepted job: run the kind's preparation in a pool process, record it.

The preparation itself is the kind's (its registry entry names the function); here: the call, the progress file
the supervisor polls and work/<id>/prepared.json, the record of what the pool reads. It must not import torch, touch
the ledger or the inbox; failures come back as PreprocessFailed with a retryable flag.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from daemon.diskspace import full_disk_error, no_space_text, removed_on_error
from daemon.jobfiles import PREPARED_FILE, PROGRESS_FILE
from daemon.states import ErrorKind
from inbox_schema import Job
from inbox_schema.kinds import resolve
from pipeline.preprocess.contract import PreprocessFailed, PrepSettings

__all__ = ["PrepSettings", "PreprocessFailed", "ProgressFile", "die_with", "prepare_job", "prepared_inputs",
           "read_progress", "warm_up"]


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


def prepare_job(job: Job, work_dir: str, settings: PrepSettings) -> dict[str, Any]:
    """Prepare one job (runs in a pool process) with its kind's preparation; returns the record written to
    work/<id>/prepared.json: {"inputs": role -> path, "info", "seconds"}."""
    started = time.monotonic()
    work = Path(work_dir)
    try:
        prepare = resolve(job.spec.prepare)
        prepared = prepare(job, work, settings, ProgressFile(work))
        record = {"inputs": prepared.inputs, "info": prepared.info, "seconds": round(time.monotonic() - started, 3)}
        temp = work / f".{PREPARED_FILE}.tmp"
        with removed_on_error(temp):
            temp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        os.replace(temp, work / PREPARED_FILE)  # written last: its presence means preparation finished
    except Exception as exc:
        raise preparation_failure(exc, work) from None
    return record


def preparation_failure(exc: Exception, work: Path) -> PreprocessFailed:
    """What a failed preparation was: a full disk (the host's problem, whatever library raised it: the job waits),
    a bad input (not retried), or a bug or resource problem (retried)."""
    full = full_disk_error(exc)
    if full is not None:
        return PreprocessFailed(no_space_text(full, work, "preparing its inputs"), ErrorKind.DISK.value, True)
    if isinstance(exc, PreprocessFailed):
        return exc
    if isinstance(exc, (OSError, ValueError)):
        return PreprocessFailed(f"preprocessing failed: {type(exc).__name__}: {exc}", "input", False)
    return PreprocessFailed(f"preprocessing failed: {type(exc).__name__}: {exc}", "internal", True)
