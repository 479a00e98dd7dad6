"""The ledger's record of notifications: one row per webhook or post-job command owed for a job's end, and
one row per attempt to deliver it, so that nothing owed is lost across restarts and `show` can say what happened.

Tables and short transactions only (the ledger's engine, the ledger's rules); it must not send anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from daemon.ledger import Base, Ledger, UTCDateTime, utcnow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"  # a notification's states
WEBHOOK, COMMAND = "webhook", "command"  # its channels


class Notification(Base):
    """Something owed to someone because a job ended: a webhook POST or the post-job command."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))  # the end state: done, failed, rejected
    channel: Mapped[str] = mapped_column(String(16))  # webhook | command
    scope: Mapped[str] = mapped_column(String(8))  # server (the config's) | job (the manifest's)
    target: Mapped[str] = mapped_column(Text)  # the URL, or the command as a JSON argv list
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)  # the job's facts, as sent
    state: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())  # also the lease of an attempt in flight
    last_result: Mapped[str | None] = mapped_column(Text)  # "200", "connection refused; retrying in 60 s", ...
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_notifications_due", "state", "next_attempt_at"),)


class NotificationAttempt(Base):
    """One try: when, how long, and what came back (HTTP status or exit status, error or output tail)."""

    __tablename__ = "notification_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    seconds: Mapped[float] = mapped_column(Float)
    status: Mapped[int | None] = mapped_column(Integer)  # HTTP status / exit status; None: no answer
    detail: Mapped[str] = mapped_column(Text)  # the error, or the command's output tail


@dataclass(frozen=True)
class Owed:
    """A notification to add: what, for which end, to whom."""

    channel: str
    scope: str
    target: str


class DeliveryStore:
    """The two tables over a Ledger's engine; each method is one short transaction, safe across processes."""

    def __init__(self, ledger: Ledger) -> None:
        self._read = sessionmaker(ledger.engine, expire_on_commit=False)
        # BEGIN IMMEDIATE on SQLite, as the ledger does: read-then-write waits politely for other writers.
        self._write = sessionmaker(ledger.engine.execution_options(sqlite_begin="IMMEDIATE"),
                                   expire_on_commit=False)  # fmt: skip

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            yield session

    def add(self, job_id: str, event: str, payload: dict[str, Any], owed: list[Owed],
            now: datetime | None = None) -> list[int]:
        """Record notifications owed for a job's end, all due now; returns their ids."""
        now = now or utcnow()
        rows = [Notification(job_id=job_id, event=event, channel=o.channel, scope=o.scope, target=o.target,
                             payload=payload, state=PENDING, attempts=0, next_attempt_at=now, created_at=now)
                for o in owed]  # fmt: skip
        with self._writing() as session:
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def claim_due(self, now: datetime, lease: dict[str, timedelta], limit: int,
                  skip: frozenset[int] = frozenset()) -> list[Notification]:
        """Take up to `limit` due notifications, pushing their due time out by their channel's lease.

        The lease makes an attempt in flight invisible to other claimers (threads, hosts sharing a
        PostgreSQL ledger) and makes it due again if this process dies before recording its outcome.
        """
        stmt = (select(Notification).where(Notification.state == PENDING, Notification.next_attempt_at <= now)
                .order_by(Notification.next_attempt_at, Notification.id).limit(limit + len(skip))
                .with_for_update(skip_locked=True))  # fmt: skip
        with self._writing() as session:
            rows = [row for row in session.scalars(stmt) if row.id not in skip][:limit]
            for row in rows:
                row.next_attempt_at = now + lease[row.channel]
            return rows

    def next_due(self) -> datetime | None:
        """When the earliest pending notification is due (None when nothing is pending)."""
        stmt = select(Notification.next_attempt_at).where(Notification.state == PENDING)
        with self._read() as session:
            return session.scalars(stmt.order_by(Notification.next_attempt_at).limit(1)).first()

    def record(self, notification_id: int, at: datetime, seconds: float, status: int | None, detail: str,
               *, state: str, result: str, retry_at: datetime | None = None) -> None:
        """One attempt's outcome, and the notification's new state (pending with retry_at, or final)."""
        values: dict[str, Any] = {"state": state, "last_result": result, "attempts": Notification.attempts + 1}
        if state == PENDING:
            values["next_attempt_at"] = retry_at
        else:
            values["finished_at"] = at + timedelta(seconds=seconds)
        with self._writing() as session:
            session.add(NotificationAttempt(notification_id=notification_id, at=at, seconds=round(seconds, 3),
                                            status=status, detail=detail))  # fmt: skip
            session.execute(update(Notification).where(Notification.id == notification_id).values(**values))

    def for_job(self, job_id: str) -> list[tuple[Notification, list[NotificationAttempt]]]:
        """A job's notifications, oldest first, each with its attempts."""
        with self._read() as session:
            rows = list(session.scalars(select(Notification).where(Notification.job_id == job_id)
                                        .order_by(Notification.id)))  # fmt: skip
            ids = [row.id for row in rows]
            tries = list(session.scalars(select(NotificationAttempt)
                                         .where(NotificationAttempt.notification_id.in_(ids))
                                         .order_by(NotificationAttempt.id))) if ids else []  # fmt: skip
        return [(row, [t for t in tries if t.notification_id == row.id]) for row in rows]

    def get(self, notification_id: int) -> Notification | None:
        with self._read() as session:
            return session.get(Notification, notification_id)
