"""Taking running jobs back: at start-up (this host's own jobs, left running by its previous life) and by every
host's sweep (other hosts' jobs whose lease ran out). Both count the attempt and put the job back in line, or fail
it when it keeps dying; the rule for attempts that were not the job's fault is daemon/ledger/attempts.py's.

Functions over a Ledger's sessions (one short transaction each); no files are touched, only asked about.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from daemon.ledger.attempts import charged, excused_recovery
from daemon.ledger.leases import expired_query
from daemon.ledger.statements import move_state
from daemon.ledger.tables import JobRecord
from daemon.states import RETRY_STATE, RUNNING, ErrorKind, JobState

if TYPE_CHECKING:
    from daemon.ledger.store import Ledger

log = logging.getLogger(__name__)
AT_START = "recovered at start-up"


def still_prepared(job: JobRecord, has_prepared_inputs: Callable[[JobRecord], bool] | None) -> bool:
    if job.state == JobState.PREPROCESSING or has_prepared_inputs is None:
        return True
    try:
        return bool(has_prepared_inputs(job))
    except Exception:
        # A raising callback must not stop the recovery of the other jobs: preparing again is always safe.
        log.exception("job %s: checking its prepared inputs failed; it will be prepared again", job.id)
        return False


def recover_interrupted(ledger: Ledger, now: datetime, has_prepared_inputs: Callable[[JobRecord], bool] | None,
                        excuse: Callable[[JobRecord], bool] | None) -> list[tuple[str, JobState, JobState]]:
    """preprocessing -> queued; sampling/finalizing -> ready, or queued when its prepared inputs are gone; failed
    when out of attempts. Only this host's jobs (and those no host holds): another live host's are its own, a dead
    one's go by the sweep once their lease ends. `excuse(job)` True: not the job's doing (see attempts.py)."""
    mine = JobRecord.holder.is_(None)
    if ledger.host_id is not None:
        mine = or_(mine, JobRecord.holder == ledger.host_id)
    with ledger._reading() as session:
        stuck = list(session.scalars(select(JobRecord).where(JobRecord.state.in_(RUNNING), mine)
                                     .order_by(JobRecord.created_at)))  # fmt: skip
    moved = []
    for job in stuck:
        excused = excuse is not None and excuse(job)
        with ledger._writing() as session:
            to = put_back(session, job, now, still_prepared(job, has_prepared_inputs), excused, AT_START, mine)
        if to is not None:
            moved.append((job.id, job.state, to))
    return moved


def release_orphans(ledger: Ledger, now: datetime, active: set[str],
                    has_prepared_inputs: Callable[[JobRecord], bool] | None) -> list[tuple[str, JobState, JobState]]:
    """Running jobs this host holds in the ledger but no longer runs (`active`: what its pools run): their result
    was lost on the way to the ledger (e.g. the database was away when the pool said done). Put back, excused,
    so that they run again instead of being held (and their leases renewed) for ever."""
    assert ledger.host_id is not None
    mine = JobRecord.holder == ledger.host_id
    with ledger._reading() as session:
        held = list(session.scalars(select(JobRecord).where(JobRecord.state.in_(RUNNING), mine)
                                    .order_by(JobRecord.created_at)))  # fmt: skip
    moved = []
    why = f"no longer running on its host {ledger.host_id} (its result was lost on the way to the ledger)"
    for job in (j for j in held if j.id not in active):
        with ledger._writing() as session:
            to = put_back(session, job, now, still_prepared(job, has_prepared_inputs), True, why, mine)
        if to is not None:
            moved.append((job.id, job.state, to))
    return moved


def take_expired(ledger: Ledger, now: datetime,
                 has_prepared_inputs: Callable[[JobRecord], bool] | None) -> list[tuple[str, JobState, JobState]]:
    """The sweep, in one transaction: expired jobs of other hosts, each put back with the host named."""
    assert ledger.host_id is not None
    moved = []
    with ledger._writing() as session:
        for job in list(session.scalars(expired_query(session, ledger.host_id))):
            until = f"{job.lease_until:%H:%M:%S} UTC" if job.lease_until else "?"
            why = (f"taken back from host {job.holder} by {ledger.host_id}: its lease ran out at {until} (no "
                   "heartbeat renewed it: that host died, froze or lost the database)")
            prepared = still_prepared(job, has_prepared_inputs)
            to = put_back(session, job, now, prepared, True, why, JobRecord.holder == job.holder,
                          host=ledger.host_id)
            if to is not None:
                moved.append((job.id, job.state, to))
    return moved


def put_back(session: Session, job: JobRecord, now: datetime, prepared: bool, excused: bool, preface: str,
             guard: Any, host: str | None = None) -> JobState | None:
    """Count the interrupted attempt and move the job back in line (or to failed): one conditional move."""
    attempts = job.attempts + 1
    where = job.state.value
    fields: dict[str, Any] = {"attempts": attempts, "error_kind": ErrorKind.INTERRUPTED}
    if excused:
        to_state, text = excused_recovery(job, prepared, fields)
    elif charged(job, attempts) >= job.max_attempts:
        to_state = JobState.FAILED
        fields["last_error"] = (
            f"the worker pool or the supervisor died while running this job ({attempts} attempts, "
            f"the last one interrupted in {where}); it may be what crashes them: check its size, frame "
            f"count and the logs, then `wanbox retry {job.id}`"
        )
        text = f"gave up: {fields['last_error']}"
    else:
        to_state = RETRY_STATE[job.state] if prepared else JobState.QUEUED
        fields["last_error"] = f"interrupted in {where} (the supervisor or the worker pool stopped)"
        # No backoff here: the restart itself was the pause (systemd's RestartSec), and the attempt
        # count still stops a job that keeps killing the daemon.
        fields["retry_after"] = None
        text = f"{AT_START}: {fields['last_error']}; attempt {attempts} of {job.max_attempts}"
        if not prepared:
            text += "; its prepared inputs are gone, so it is prepared again"
    if preface != AT_START:
        text = f"{preface}; " + text.removeprefix(f"{AT_START}: ")
    if host is not None and to_state == JobState.FAILED:
        fields["holder"] = host  # the sweeping host moves its files to failed/ (ended jobs keep their holder)
    moved = move_state(session, job.id, job.state, to_state, text, now, fields, guard=guard, host=host)
    return to_state if moved else None
