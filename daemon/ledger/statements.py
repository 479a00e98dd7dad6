"""The SQL the ledger runs, one small function per statement (all inside a caller's transaction),
and the scheduling rule `next_query`. No transactions are opened or committed here."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    case,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from daemon.ledger.errors import AmbiguousJobId, IllegalTransition, JobNotFound
from daemon.ledger.leases import Fence, lease_end
from daemon.ledger.tables import SETTABLE_FIELDS, Event, JobRecord
from daemon.states import ALLOWED, RUNNING, TERMINAL, JobState

log = logging.getLogger(__name__)

def event_row(job_id: str, at: datetime, frm: JobState | None, to: JobState, message: str,
              host: str | None = None) -> Event:
    return Event(job_id=job_id, at=at, from_state=frm, to_state=to, message=message, host=host)


def lease_fields(session: Session, from_state: JobState, to_state: JobState, fence: Fence | None) -> dict[str, Any]:
    """What a move does to the lease: taking a job into a running state gives it to `fence`'s host (until the lease
    ends); a move between running states renews it; leaving them ends it (a waiting job has no holder, an ended
    one keeps its last holder: whose its files and intents were)."""
    if to_state not in RUNNING:
        return {"lease_until": None} | ({} if to_state in TERMINAL else {"holder": None})
    if fence is None:
        return {}
    return {"holder": fence.host_id, "lease_until": lease_end(session, fence.lease_seconds)}


def move_state(
    session: Session,
    job_id: str,
    from_state: JobState,
    to_state: JobState,
    message: str,
    now: datetime,
    fields: dict[str, Any],
    *,
    fence: Fence | None = None,
    guard: Any = None,
    host: str | None = None,
) -> bool:
    """UPDATE ... WHERE id = :id AND state = :from, plus the event row; False if the row moved on.

    Fenced: with `fence`, a move out of a running state happens only while that host still holds the job (the
    same UPDATE checks it); `guard` is an extra condition (the sweep's and recovery's own); the event names `host`
    (else the fence's) as its writer."""
    where = [JobRecord.id == job_id, JobRecord.state == from_state]
    if fence is not None and from_state in RUNNING:
        where.append(fence.holds())
    if guard is not None:
        where.append(guard)
    stmt = (
        update(JobRecord)
        .where(*where)
        .values(state=to_state, updated_at=now, **fields, **lease_fields(session, from_state, to_state, fence))
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).rowcount != 1:
        if session.get(JobRecord, job_id) is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return False
    session.add(event_row(job_id, now, from_state, to_state, message, host or (fence.host_id if fence else None)))
    session.flush()
    return True


def _due(from_state: JobState, kinds: Iterable[str] | None, now: datetime) -> Select[tuple[JobRecord]]:
    due = select(JobRecord).where(JobRecord.state == from_state, or_(JobRecord.retry_after.is_(None), JobRecord.retry_after <= now))
    return due if kinds is None else due.where(JobRecord.kind.in_(list(kinds)))


def next_query(
    from_state: JobState,
    kinds: Iterable[str] | None,
    now: datetime,
    *,
    model_id: str | None = None,
    max_wait: timedelta | None = None,
    loaded_since: datetime | None = None,
    fresh: bool = False,
    lock: bool = True,
) -> Select[tuple[JobRecord]]:
    """The scheduling rule, as one query on every backend: the next due job in `from_state`.

    Due: retry_after is null or has come. Then, first match wins:
    1. a freshly loaded pool (`fresh`: it has run no job yet) takes its own model's best job (by 3):
       it was loaded for one, and switching straight back would only ping-pong;
    2. a job of another model that has waited longer than `max_wait`, counted from the later of its
       creation and `loaded_since` (so each model holds the pool at most that long while others wait):
       the longest-waiting one (oldest created_at);
    3. highest priority, then the loaded model's jobs, then oldest (created_at, id).
    With `lock`, the row is locked FOR UPDATE SKIP LOCKED (PostgreSQL: claimers on several hosts pass over
    each other's rows instead of queueing; SQLite has no row locks and renders nothing: its IMMEDIATE
    write transaction already serialises claimers).
    """
    mine = JobRecord.model_id == model_id if model_id is not None else None
    order: list[Any] = []
    if fresh and mine is not None:
        order.append(case((mine, 0), else_=1))
    overdue = _overdue(model_id, now, max_wait, loaded_since)
    if overdue is not None:
        order += [case((overdue, 0), else_=1), case((overdue, JobRecord.created_at), else_=None)]
    order.append(JobRecord.priority.desc())
    if mine is not None:
        order.append(case((mine, 0), else_=1))
    stmt = _due(from_state, kinds, now).order_by(*order, JobRecord.created_at, JobRecord.id).limit(1)
    return stmt.with_for_update(skip_locked=True) if lock else stmt


def _overdue(model_id: str | None, now: datetime, max_wait: timedelta | None, loaded_since: datetime | None) -> Any:
    """SQL for "a job of another model that waited more than max_wait"; None when none can be."""
    if model_id is None or max_wait is None:
        return None  # nothing loaded: no model holds the pool, so nobody waits for it
    cutoff = now - max_wait
    if loaded_since is not None and loaded_since >= cutoff:
        return None  # the loaded model has not had its max_wait yet: every job's wait counts from its load
    return and_(or_(JobRecord.model_id.is_(None), JobRecord.model_id != model_id), JobRecord.created_at < cutoff)


def get_for_update(session: Session, job_id: str) -> JobRecord:
    job = session.scalars(select(JobRecord).where(JobRecord.id == job_id).with_for_update()).first()
    if job is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    return job


def resolve(session: Session, text: str) -> JobRecord:
    """Exact id first, then the most recent job of that name, then a unique id prefix."""
    wanted = text.strip()
    job = session.get(JobRecord, wanted) if wanted else None
    if job is not None:
        return job
    if not wanted:
        raise JobNotFound("no job id given")
    named = select(JobRecord).where(JobRecord.name == wanted)
    job = session.scalars(named.order_by(JobRecord.created_at.desc(), JobRecord.id.desc()).limit(1)).first()
    if job is not None:
        return job
    stmt = select(JobRecord).where(JobRecord.id.startswith(wanted, autoescape=True)).order_by(JobRecord.id).limit(6)
    matches = list(session.scalars(stmt))
    if not matches:
        raise JobNotFound(f"no job with id or id prefix {wanted!r}, and no job of that name "
                          "(see `wanbox status` for job ids and names)")
    if len(matches) > 1:
        shown = ", ".join(f"{m.id} ({m.name})" for m in matches[:5])
        more = " and more" if len(matches) > 5 else ""
        raise AmbiguousJobId(f"job id prefix {wanted!r} matches several jobs: {shown}{more}; type more of it")
    return matches[0]


def was_accepted(session: Session, job_id: str) -> bool:
    stmt = select(Event.id).where(Event.job_id == job_id, Event.to_state == JobState.QUEUED).limit(1)
    return session.scalars(stmt).first() is not None


def check_edge(job_id: str, from_state: JobState, to_state: JobState) -> None:
    if to_state not in ALLOWED[from_state]:
        raise IllegalTransition(job_id, from_state, to_state)


def check_fields(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - SETTABLE_FIELDS)
    if unknown:
        raise ValueError(
            f"cannot set job field(s) {', '.join(unknown)} in a transition: expected some of "
            f"{', '.join(sorted(SETTABLE_FIELDS))}"
        )


def failure_text(error: str, kind: str, retryable: bool, attempts: int, max_attempts: int) -> str:
    if retryable and attempts >= max_attempts:
        return f"gave up after {attempts} of {max_attempts} attempts; the last failed ({kind}): {error}"
    return f"failed ({kind}, not retryable) on attempt {attempts}: {error}"


def audit_job(job_id: str, state: JobState, chain: list[tuple[JobState | None, JobState]]) -> list[str]:
    if not chain:
        return [f"job {job_id}: no events at all"]
    problems = []
    if chain[0][0] is not None:
        problems.append(f"job {job_id}: first event is {chain[0][0]} -> {chain[0][1]}, not a creation")
    for (_, before), (frm, to) in zip(chain, chain[1:], strict=False):
        if frm != before:
            problems.append(f"job {job_id}: event {frm} -> {to} follows one that ended in {before}")
        elif frm is not None and to not in ALLOWED[frm]:
            problems.append(f"job {job_id}: illegal event {frm} -> {to}")
    if chain[-1][1] != state:
        problems.append(f"job {job_id}: state is {state} but the last event went to {chain[-1][1]}")
    return problems
