"""The post-job command (paperless-ngx's post-consume convention): the job's facts as WANBOX_* variables, a
timeout that kills the command with all its children, and the exit status plus the tail of its output.

It must not decide anything about the job: whatever the command does or however it ends, the job stays as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

OUTPUT_TAIL_BYTES = 4000  # of the command's output (stdout and stderr together) kept with the attempt
TERM_GRACE_SECONDS = 2.0  # after the timeout: SIGTERM to the command's process group, then SIGKILL


@dataclass(frozen=True)
class CommandOutcome:
    """How the command ended: exit status (None when killed at the timeout or not started), output tail."""

    ok: bool
    status: int | None
    detail: str
    seconds: float


def job_environment(event: str, job: dict[str, Any]) -> dict[str, str]:
    """The WANBOX_* variables for a job's payload; every name is always set (empty when it does not apply)."""
    outputs = job.get("outputs") or {}
    return {
        "WANBOX_JOB_ID": str(job.get("job_id") or ""),
        "WANBOX_JOB_NAME": str(job.get("name") or ""),
        "WANBOX_JOB_KIND": str(job.get("kind") or ""),
        "WANBOX_MODEL": str(job.get("model_id") or ""),
        "WANBOX_STATE": event,
        "WANBOX_VIDEO": str(outputs.get("video") or ""),
        "WANBOX_POSTER": str(outputs.get("poster") or ""),
        "WANBOX_SIDECAR": str(outputs.get("sidecar") or ""),
        "WANBOX_FAILED_DIR": str(outputs.get("failed_dir") or ""),
        "WANBOX_SEED": "" if job.get("seed") is None else str(job["seed"]),
        "WANBOX_ERROR": str(job.get("error") or ""),
        "WANBOX_PAYLOAD": json.dumps(job, sort_keys=True, default=str),  # everything, for scripts that want more
    }


def run_command(argv: list[str], extra_env: dict[str, str], timeout: float) -> CommandOutcome:
    """Run `argv` (no shell) with `extra_env` added, in its own session; never raises.

    Output goes to a temporary file rather than a pipe: a child that keeps the pipe open (a backgrounded
    process) cannot make us wait, and a chatty command cannot fill our memory.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(argv, env={**os.environ, **extra_env}, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        except (OSError, ValueError) as exc:
            return CommandOutcome(False, None, f"could not start {argv[0] if argv else '(empty)'}: {exc}",
                                  time.monotonic() - started)  # fmt: skip
        try:
            status: int | None = proc.wait(timeout)  # what it started in the background may go on
        except subprocess.TimeoutExpired:
            status = None
            _stop(proc)
        tail = _tail(output)
    seconds = time.monotonic() - started
    if status is None:
        detail = f"killed after the {timeout:g} s timeout"
    elif status < 0:
        detail = f"killed by signal {signal.Signals(-status).name}"
    else:
        detail = f"exit status {status}"
    return CommandOutcome(status == 0, status, detail + (f"; output: {tail}" if tail else ""), seconds)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    _kill_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(TERM_GRACE_SECONDS)
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(output: Any) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - OUTPUT_TAIL_BYTES))
    text = output.read().decode("utf-8", "replace").strip()
    return ("…" if size > OUTPUT_TAIL_BYTES else "") + text
