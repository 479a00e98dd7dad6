"""The supervisor's side of leases: at the heartbeat's pace, renew the leases of this host's running jobs and
take back the jobs of other hosts whose lease ran out (their host died, froze or lost the database).

It only sequences the ledger's calls (renew_leases, take_expired) and what follows a job put back or given up;
the rules are the ledger's (daemon/ledger/leases.py, takeover.py). It must never raise into the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from daemon.failures import Failures
from daemon.journal import jlog, log
from daemon.ledger import Ledger
from daemon.preprocessing import prepared_inputs
from daemon.states import JobState


def has_prepared_inputs(job: object) -> bool:
    work = getattr(job, "work_dir", None)
    return prepared_inputs(Path(work or "/nonexistent")) is not None


class Leases:
    """Renew ours, sweep theirs; `settle` reports jobs moved by recovery or the sweep (and fails those out of luck)."""

    def __init__(self, ledger: Ledger, failures: Failures) -> None:
        self.ledger, self.failures = ledger, failures

    def beat(self, active: set[str]) -> None:
        """`active`: the jobs this host's pools really run now (the others it holds lost their result)."""
        try:
            self.ledger.renew_leases()
            orphans = self.ledger.release_orphans(active, has_prepared_inputs=has_prepared_inputs)
            moved = self.ledger.take_expired(has_prepared_inputs=has_prepared_inputs)
        except SQLAlchemyError as exc:  # the database is away: the next beat tries again (status says stale)
            log.warning("leases: cannot renew or sweep: %s", exc)
            return
        self.settle(orphans, "put back in line: its result was lost on the way to the ledger")
        self.settle(moved, "taken back from a host whose lease ran out")

    def settle(self, moved: list[tuple[str, JobState, JobState]], why: str) -> None:
        for job_id, frm, to in moved:
            jlog(logging.WARNING, job_id, "%s: %s -> %s", why, frm, to)
            if to == JobState.FAILED:  # out of attempts: its files and the reason go to failed/<name>/ too
                record = self.ledger.get(job_id)
                self.failures.move_inputs(job_id, record.name, record.last_error or "interrupted", record.error_kind)
                self.failures.ended(job_id)
