"""How a job reads on the terminal: the status table, progress and ETA columns, why a staged job waits,
where its manifest is now. Text only: it reads records it is given and never writes the ledger or files.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.states import JobState


def _age(when: datetime | None) -> str:
    return "-" if when is None else _duration((datetime.now(timezone.utc) - when).total_seconds())


def job_summary(job: Any, eta: Any = None) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "kind": job.kind, "model_id": job.model_id, "state": job.state.value,
        "priority": job.priority, "attempts": job.attempts_made, "max_attempts": job.max_attempts,
        "phase": job.phase, "step": job.step, "total_steps": job.total_steps,
        "last_error": job.last_error, "error_kind": job.error_kind, "created_at": job.created_at,
        "updated_at": job.updated_at, "retry_after": job.retry_after, "outputs": job.outputs_json,
        "eta_seconds": eta.remaining_s if eta else None, "job_seconds_estimate": eta.total_s if eta else None,
        "queue_position": eta.queue_position if eta else None,
        "waiting": waiting_text(job) or None, "staged_deadline": job.staged_deadline,
        "host": job.holder,  # the host running it (or, once ended, the last one that did)
    }  # fmt: skip


def progress_bar(step: int | None, total: int | None, width: int = 20) -> str:
    if not total or step is None:
        return ""
    filled = int(width * min(step, total) / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"


def eta_text(eta: Any) -> str:
    """The ETA column: until delivery, from measured phase times of earlier jobs like this one."""
    if eta is None:
        return ""
    if eta.remaining_s is None:
        return "no estimate yet"
    return f"done in ~{eta.remaining_s:.0f}s"


def render_status(jobs: list[Any], counts: dict[str, int], stale: Any = None, etas: dict[str, Any] | None = None
                  ) -> str:
    """The job table; `stale(job)` marks in-flight jobs that no live daemon runs; `etas` (daemon.estimates)
    gives each active job's time left and queue position."""
    etas = etas or {}
    header = f"{'JOB':<22} {'NAME':<24} {'KIND':<8} {'STATE':<13} {'AGE':>5}  PROGRESS"
    lines = [header]
    for job in jobs:
        progress = ""
        if stale is not None and stale(job):  # where it stopped, but no ETA: nothing is running it
            progress = f"STALE, the daemon is gone; last: {job.phase or '-'} {progress_bar(job.step, job.total_steps)}"
        elif job.phase and job.state.value in ("preprocessing", "sampling", "finalizing"):
            progress = f"{job.phase} {progress_bar(job.step, job.total_steps)} {eta_text(etas.get(job.id))}".strip()
        elif job.state.value in ("failed", "rejected") and job.last_error:
            progress = job.last_error.splitlines()[0][:80]
        elif waiting := waiting_text(job):  # staged, or held back by a full disk
            progress = waiting
        elif job.state.value == "done":
            progress = str((job.outputs_json or {}).get("video", ""))
        elif (job.retry_after is not None and job.state.value in ("queued", "ready")
              and job.retry_after > datetime.now(timezone.utc)):
            progress = f"retry after {job.retry_after:%H:%M:%S} UTC (attempt {job.attempts + 1})"
        elif job.state.value in ("queued", "ready") and job.id in etas:
            e = etas[job.id]
            progress = f"#{e.queue_position} in line (priority {job.priority}), {eta_text(e)}"
        lines.append(f"{job.id:<22} {job.name[:24]:<24} {job.kind:<8} {job.state.value:<13} "
                     f"{_age(job.created_at):>5}  {progress}")
    lines.append("")
    lines.append("  ".join(f"{state}: {n}" for state, n in counts.items() if n))
    return "\n".join(lines)


def manifest_location(job: Any, cfg: Config) -> str:
    """Where the job's manifest is now: the inbox while staged, then work/<id>/inbox/, or failed/<name>/."""
    from daemon import jobfiles

    uploaded = Path(job.manifest_path)
    if uploaded.exists():
        return str(uploaded)
    folders = [jobfiles.work_inputs_dir(cfg.paths.work, job.id)]
    failed_dir = (job.outputs_json or {}).get("failed_dir")
    pointer = folders[0].parent / jobfiles.FAILED_POINTER
    if failed_dir is None and pointer.is_file():
        failed_dir = pointer.read_text(encoding="utf-8").strip()
    if failed_dir:
        folders.append(Path(failed_dir))
    for folder in folders:
        for name in (uploaded.name, "job.toml"):
            if (folder / name).is_file():
                return f"{folder / name} (uploaded as {uploaded})"
    return f"{uploaded} (no longer there)"


def namesakes_note(ledger: Any, job: Any, typed: str) -> str:
    """When a name picked the job (its most recent one), which other jobs carry that name, to pick by id."""
    if typed.strip() != job.name or typed.strip() == job.id:
        return ""
    others = ledger.namesakes(job)
    if not others:
        return ""
    listed = ", ".join(f"{o.id} ({o.state.value})" for o in others[:5])
    return f"  (the most recent job named {job.name}; also named so: {listed}; give an id to pick another)"


def waiting_text(job: Any) -> str:
    """Why a staged job is not accepted yet and until when it may wait, or why a queued/ready job waits for disk
    space; empty for any other job."""
    if job.state.value in ("queued", "ready") and str(job.error_kind or "") == "disk" and job.last_error:
        return f"waiting: {job.last_error}"
    if job.state.value != "staged":
        return ""
    reason = job.waiting_reason or "the manifest and its inputs are settling (being checked)"
    if job.staged_deadline is None:
        return f"waiting: {reason}"
    left = (job.staged_deadline - datetime.now(timezone.utc)).total_seconds()
    when = f"{job.staged_deadline:%Y-%m-%d %H:%M:%S} UTC"
    due = f"rejected at {when} (in {_duration(left)})" if left > 0 else f"deadline {when} passed: rejected on the next check"
    return f"waiting: {reason}; {due} unless fixed"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def attempt_hosts(events: list[Any]) -> str:
    """Which host ran each attempt on a pool, from the events that sent the job there: "1 host-a, 2 host-b" (""
    when no event names a host: written before revision 0006)."""
    runs = [e.host for e in events if getattr(e, "to_state", None) == JobState.SAMPLING]
    if not any(runs):
        return ""
    return ", ".join(f"{n} {host or '?'}" for n, host in enumerate(runs, 1))
