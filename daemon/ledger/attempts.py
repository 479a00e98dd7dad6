"""Whose fault an attempt was: attempts interrupted by a supervisor (or host) death are counted, but not held
against the job's max_attempts, until so many of them suggest the job itself is what kills the supervisor.

Pure rules over a job row (no database, no files); the Ledger applies them in its transactions.
"""

from __future__ import annotations

from typing import Any

from daemon.ledger.tables import JobRecord
from daemon.states import RETRY_STATE, JobState


def charged(job: JobRecord, attempts: int) -> int:
    """Of `attempts` (the job's count after this one), those that were the job's own doing."""
    return attempts - (job.excused_attempts or 0)


def excused_limit(job: JobRecord) -> int:
    """Supervisor deaths during one job that end it as a suspect: at least 10, or 3 times its max_attempts."""
    return max(10, 3 * job.max_attempts)


def excused_recovery(job: JobRecord, prepared: bool, fields: dict[str, Any]) -> tuple[JobState, str]:
    """Where a job interrupted by a supervisor death goes at start-up, and the event's text; sets `fields`."""
    excused = (job.excused_attempts or 0) + 1
    fields["excused_attempts"] = excused
    where = job.state.value
    if excused >= excused_limit(job):
        fields["last_error"] = (
            f"the supervisor (or its host) died {excused} times while running this job, the last time in "
            f"{where}; it may be what crashes them: check its size, frame count and the logs, then "
            f"`wanbox retry {job.id}`")  # fmt: skip
        return JobState.FAILED, f"gave up: {fields['last_error']}"
    fields["last_error"] = f"interrupted in {where} (the supervisor stopped; not the job's fault)"
    fields["retry_after"] = None  # no backoff: the restart itself was the pause
    text = (f"recovered at start-up: {fields['last_error']}; not counted against its {job.max_attempts} attempts "
            f"({charged(job, job.attempts)} used; supervisor interruption {excused} of at most "
            f"{excused_limit(job) - 1})")  # fmt: skip
    if not prepared:
        text += "; its prepared inputs are gone, so it is prepared again"
    return (RETRY_STATE[job.state] if prepared else JobState.QUEUED), text
