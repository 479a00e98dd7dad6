"""Leases and fencing: which host holds a running job, until when (on the database's clock), and the one SQL
predicate every write a holder makes must pass ("the job is still mine").

A lease is revoked only by the sweep (`expired_query` rows taken back by another host, holder cleared in the same
transaction), so `holder = me` is exactly "my lease was not taken": a holder whose loop stalled past its lease but
was not swept yet still owns the job and may go on. Statement fragments only; transactions are the Ledger's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, Select

from daemon.ledger.tables import JobRecord, utcnow
from daemon.states import RUNNING

DEFAULT_LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class Fence:
    """A supervisor's identity in the ledger: its host id and how long a lease it takes (renewed by its heartbeat)."""

    host_id: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    def holds(self) -> ColumnElement[bool]:
        """The fencing predicate: the job is still held by this host."""
        return JobRecord.holder == self.host_id


def db_now(session: Session) -> Any:
    """The database's clock: PostgreSQL's now(), so that hosts' clocks matter less; SQLite has no server (one host
    reaches its file): this host's clock is the database's."""
    if session.get_bind().dialect.name == "postgresql":
        return func.now()
    return utcnow()


def lease_end(session: Session, seconds: float) -> Any:
    """`seconds` from now on the database's clock: the lease_until a claim or renewal writes."""
    return db_now(session) + timedelta(seconds=seconds)


def expired_query(session: Session, host_id: str) -> Select[tuple[JobRecord]]:
    """Running jobs held by other hosts whose lease has run out, locked (SKIP LOCKED: sweepers on several hosts
    share them out instead of queueing). A host never sweeps its own: it still runs them (or recovers them at
    start-up)."""
    stmt = (select(JobRecord)
            .where(JobRecord.state.in_(RUNNING), JobRecord.holder.is_not(None), JobRecord.holder != host_id,
                   JobRecord.lease_until < db_now(session))
            .order_by(JobRecord.lease_until, JobRecord.id))  # fmt: skip
    return stmt.with_for_update(skip_locked=True)
