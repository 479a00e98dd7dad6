"""What the status page and its JSON API show: the queue, live progress, the pool and GPUs, outputs, failures.

Plain dicts built from short read transactions on the ledger (the JSON shape is the API's contract); it must
not write anything, serve HTTP or touch files other than naming outbox files by their URL.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon.estimates import JobEta, claim_order, job_etas
from daemon.jobtext import waiting_text
from daemon.liveness import Liveness, job_daemon_events, read_liveness
from daemon.states import RUNNING, JobState

S = JobState
QUEUE_STATES = (S.STAGED, S.QUEUED, S.READY)  # waiting: for the upload, a CPU slot, the GPU pool
QUEUE_SHOWN = 100


def file_url(path: str | None, outbox: Path) -> str | None:
    """/files/<name> for a file delivered in the outbox; None for anything else (never a path elsewhere)."""
    if not path:
        return None
    file = Path(path)
    return f"/files/{quote(file.name)}" if file.parent == outbox else None


def phase_eta_seconds(job: Any) -> float | None:
    """Seconds left in the sampling phase at the pace so far; None otherwise (the job's own: `job_eta_seconds`)."""
    if job.phase != "sampling" or not job.step or not job.total_steps or job.progress_at is None:
        return None
    elapsed = (job.progress_at - job.updated_at).total_seconds()
    return round(elapsed / job.step * (job.total_steps - job.step), 1) if elapsed > 0 else None


def job_json(job: Any, outbox: Path, liveness: Liveness | None = None, eta: JobEta | None = None) -> dict[str, Any]:
    """One job as the page shows it; fields not known yet are null (ETAs without history, why a staged job
    waits). `eta` (daemon.estimates): seconds until delivered, the whole job's, the place in the queue."""
    total, step = job.total_steps, job.step
    outputs = job.outputs_json or {}
    return {
        "id": job.id, "name": job.name, "kind": job.kind, "model_id": job.model_id, "state": job.state.value,
        "priority": job.priority, "attempts": job.attempts_made, "max_attempts": job.max_attempts,
        "created_at": job.created_at, "updated_at": job.updated_at, "retry_after": job.retry_after,
        "progress": {"phase": job.phase, "step": step, "total": total, "updated_at": job.progress_at,
                     "fraction": round(min(step, total) / total, 4) if total and step is not None else None},
        "eta_seconds": phase_eta_seconds(job) if job.state in RUNNING else None,
        "job_eta_seconds": eta.remaining_s if eta else None, "job_seconds_estimate": eta.total_s if eta else None,
        "queue_position": eta.queue_position if eta else None, "waiting": waiting_text(job) or None,
        "stale": bool(liveness and liveness.stale(job)),
        "error": job.last_error, "error_kind": job.error_kind,
        "gpu_seconds": job.gpu_seconds, "timings": job.timings_json or {},
        "files": {role: file_url(path, outbox) for role, path in outputs.items()},
    }  # fmt: skip


def queue_json(jobs: list[Any], outbox: Path, etas: dict[str, JobEta]) -> list[dict[str, Any]]:
    """Waiting jobs in the order the pool takes them (priority, then age); staged ones have no position yet."""
    order = sorted(jobs, key=lambda j: (j.state == S.STAGED, *claim_order(j)))
    return [job_json(job, outbox, eta=etas.get(job.id)) for job in order[:QUEUE_SHOWN]]


def status_json(ledger: Any, root: Path, state_dir: Path, outbox: Path, recent: int,
                controls: bool) -> dict[str, Any]:
    """GET /api/status: everything the page shows, in one document."""
    now = datetime.now(timezone.utc)
    liveness = read_liveness(ledger.engine, root, state_dir, now)
    running = ledger.list(states=list(RUNNING), limit=None, newest_first=False)
    etas = job_etas(ledger, now)
    return {
        "generated_at": now,
        **liveness.to_json(),
        "counts": {s.value: n for s, n in ledger.counts_by_state().items()},
        "running": [job_json(j, outbox, liveness, etas.get(j.id)) for j in running],
        "queue": queue_json(ledger.list(states=list(QUEUE_STATES), limit=None), outbox, etas),
        "recent": [job_json(j, outbox) for j in ledger.list(states=[S.DONE], limit=recent)],
        "failures": [job_json(j, outbox) for j in ledger.list(states=[S.FAILED, S.REJECTED], limit=recent)],
        "controls": controls,
    }


def job_detail_json(ledger: Any, job_id: str, root: Path, state_dir: Path, outbox: Path) -> dict[str, Any]:
    """GET /api/jobs/<id>: one job with its parameters, events and the daemon's starts, stops and deaths."""
    job = ledger.get(job_id)
    eta = job_etas(ledger).get(job.id)
    events = ledger.events(job.id)
    daemon_events = job_daemon_events(ledger.engine, root, state_dir, job, events)
    return {
        **job_json(job, outbox, read_liveness(ledger.engine, root, state_dir), eta),
        "parameters": job.params_json,
        "events": [{"at": e.at, "from": e.from_state.value if e.from_state else None, "to": e.to_state.value,
                    "message": e.message} for e in events],
        "daemon_events": [{"at": at, "message": text} for at, text in daemon_events],
    }  # fmt: skip
