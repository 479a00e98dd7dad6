"""The ledger's intents: the file operation a job is in the middle of (accept, reject, fail, finalize) and the
names it chose, recorded BEFORE any file is written, so that a restart redoes exactly that operation.

One row per job, in short transactions over the Ledger's engine; it must not touch files (daemon/redo.py does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, delete, or_, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from daemon.ledger.store import Ledger
from daemon.ledger.tables import Base, UTCDateTime, utcnow

ACCEPT, REJECT, FAIL, FINALIZE = "accept", "reject", "fail", "finalize"
HOLDERS = frozenset({FAIL, FINALIZE})  # a job's holder's operations: fenced (an accept or reject has its ingest claim)


class Intent(Base):
    """What the daemon set out to do with a job's files, and where they go (the plan: names, texts, fields)."""

    __tablename__ = "intents"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    action: Mapped[str] = mapped_column(String(16))  # accept | reject | fail | finalize
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    host_id: Mapped[str | None] = mapped_column(String(128))  # whose it is: start-up redoes its own only (0006)

    def __repr__(self) -> str:
        return f"<Intent {self.job_id} {self.action}>"


class Intents:
    """The intents table over a Ledger's engine; each host records, redoes and clears its own intents only, and a
    holder's (fail, finalize) are written in the ledger's fenced transaction: LeaseLost once another host took the
    job, before anything of the plan could be done."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._read = sessionmaker(ledger.engine, expire_on_commit=False)
        self._write = sessionmaker(ledger.engine.execution_options(sqlite_begin="IMMEDIATE"),
                                   expire_on_commit=False)  # fmt: skip

    @contextmanager
    def _writing(self, job_id: str | None = None, action: str | None = None) -> Iterator[Session]:
        if job_id is not None and action in HOLDERS:
            with self.ledger.fenced(job_id) as session:
                yield session
            return
        with self._write() as session, session.begin():
            yield session

    def _mine(self) -> Any:
        """Intents of this host (and those written before hosts were recorded)."""
        host = self.ledger.host_id
        return Intent.host_id.is_(None) if host is None else or_(Intent.host_id.is_(None), Intent.host_id == host)

    def record(self, job_id: str, action: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Record that `action` is about to happen with `plan`; returns the plan in force.

        If the job already has an unfinished intent for the same action (a crash interrupted it), that one's
        plan is returned unchanged: the redo must write the very names the first try chose."""
        with self._writing(job_id, action) as session:
            row = session.get(Intent, job_id, with_for_update=True)
            if row is not None and row.action == action:
                return dict(row.plan)
            if row is not None:
                session.delete(row)
                session.flush()
            session.add(Intent(job_id=job_id, action=action, plan=plan, created_at=utcnow(),
                               host_id=self.ledger.host_id))
            return plan

    def replace(self, job_id: str, action: str, plan: dict[str, Any]) -> None:
        """Change the plan of an intent (a name chosen again after a foreign file took it)."""
        with self._writing(job_id, action) as session:
            session.execute(delete(Intent).where(Intent.job_id == job_id))
            session.add(Intent(job_id=job_id, action=action, plan=plan, created_at=utcnow(),
                               host_id=self.ledger.host_id))

    def get(self, job_id: str) -> Intent | None:
        with self._read() as session:
            return session.get(Intent, job_id)

    def clear(self, job_id: str, action: str | None = None) -> None:
        """The operation is complete (its end state recorded): forget the intent."""
        stmt = delete(Intent).where(Intent.job_id == job_id, self._mine())
        if action is not None:
            stmt = stmt.where(Intent.action == action)
        with self._writing() as session:
            session.execute(stmt)

    def pending(self) -> list[Intent]:
        """This host's unfinished intents, oldest first (what its start-up recovery redoes: never another live
        host's)."""
        with self._read() as session:
            return list(session.scalars(select(Intent).where(self._mine()).order_by(Intent.created_at)))
