"""The Ledger's methods for several hosts on one database: a supervisor's identity (hold_as), the fenced
transaction, renewing and sweeping leases, and the ingest claims' look-ups (rules: leases.py, takeover.py).

A mixin of the Ledger (store.py), over its sessions; like the rest of the Ledger it touches no files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from daemon.ledger.claims import IngestClaim
from daemon.ledger.errors import LeaseLost
from daemon.ledger.leases import DEFAULT_LEASE_SECONDS, Fence, db_now, lease_end
from daemon.ledger.statements import get_for_update, resolve
from daemon.ledger.tables import JobRecord, utcnow
from daemon.ledger.takeover import release_orphans, take_expired
from daemon.states import RUNNING, TERMINAL, JobState

H = TypeVar("H", bound="Holding")


class Holding:
    """Mixed into Ledger: `fence` is None until hold_as (the CLI's ledger, a ledger alone: nothing fenced)."""

    fence: Fence | None
    backend: str
    _writing: Callable[[], Any]
    _reading: Callable[[], Any]

    def hold_as(self: H, host_id: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> H:
        """From now on this ledger is host `host_id`'s: jobs it claims carry its id and a lease of `lease_seconds`,
        and its writes to them check, in the same transaction, that it still holds them."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds={lease_seconds}: expected a positive number of seconds")
        self.fence = Fence(host_id, float(lease_seconds))
        return self

    @property
    def host_id(self) -> str | None:
        return self.fence.host_id if self.fence else None

    @contextmanager
    def fenced(self, job_id: str) -> Iterator[Session]:
        """The one fenced transaction: a write transaction in which this host still holds `job_id` (its row is
        locked, and a running job's lease renewed), else LeaseLost before anything is written: another host holds
        it, or it was taken from this one and waits for the next. Without a fence (no host), a plain write transaction."""
        with self._writing() as session:
            if self.fence is not None:
                job = get_for_update(session, job_id)
                # Mine, or an ended job nobody held (e.g. failed while ready); a job that waits again after a sweep
                # took it from me is not.
                if job.holder != self.fence.host_id and not (job.holder is None and job.state in TERMINAL):
                    raise LeaseLost(job_id, self.fence.host_id)
                if job.state in RUNNING:
                    session.execute(update(JobRecord).where(JobRecord.id == job_id)
                                    .values(lease_until=lease_end(session, self.fence.lease_seconds))
                                    .execution_options(synchronize_session=False))
            yield session

    def holds(self, job_id: str) -> bool:
        """Whether this host still holds the job (always True without a fence): what delivery asks first."""
        try:
            with self.fenced(job_id):
                return True
        except LeaseLost:
            return False

    def claimed_by(self, claim: str) -> str | None:
        """The host that claimed this upload (None: nobody yet)."""
        with self._reading() as session:
            row = session.get(IngestClaim, claim)
            return row.host_id if row is not None else None

    def claim_holder(self, job_id: str) -> str | None:
        """The host whose ingest claim created this staged job (None: created without a claim, before 0006)."""
        with self._reading() as session:
            return session.scalars(select(IngestClaim.host_id).where(IngestClaim.job_id == job_id)).first()

    def renew_leases(self, seconds: float | None = None) -> int:
        """The heartbeat's one UPDATE: every running job this host holds gets a fresh lease (database clock), of
        the fence's length or `seconds` (a graceful stop's silence)."""
        if self.fence is None:
            return 0
        with self._writing() as session:
            stmt = (update(JobRecord)
                    .where(JobRecord.holder == self.fence.host_id, JobRecord.state.in_(RUNNING))
                    .values(lease_until=lease_end(session, seconds or self.fence.lease_seconds))
                    .execution_options(synchronize_session=False))  # fmt: skip
            return int(session.execute(stmt).rowcount or 0)

    def release_orphans(
        self, active: set[str], *, has_prepared_inputs: Callable[[JobRecord], bool] | None = None
    ) -> list[tuple[str, JobState, JobState]]:
        """This host's running jobs that are not in `active` (what it really runs) go back in line, excused."""
        if self.fence is None:
            return []
        return release_orphans(self, utcnow(), active, has_prepared_inputs)

    def take_expired(
        self, now: datetime | None = None, *, has_prepared_inputs: Callable[[JobRecord], bool] | None = None
    ) -> list[tuple[str, JobState, JobState]]:
        """Every host's sweep: running jobs of other hosts whose lease ran out (the host died, froze or was cut
        off) go back to their retry state, the attempt counted, the event naming the host that lost it."""
        if self.fence is None:
            return []
        return take_expired(self, now or utcnow(), has_prepared_inputs)

    def lease_info(self, job_id: str) -> tuple[str | None, datetime | None, datetime]:
        """(holder, lease_until, the database's time now): for status, show and the tests."""
        with self._reading() as session:
            job = resolve(session, job_id)
            now = session.execute(select(db_now(session))).scalar_one() if self.backend == "postgresql" else utcnow()
            return job.holder, job.lease_until, now
