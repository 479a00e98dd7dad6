"""The ledger's tables (jobs, events) and their column types, as SQLAlchemy declarative classes.

The schema itself changes only through migrations/versions; nothing here opens a database."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from daemon.states import RUNNING, ErrorKind, JobState
from inbox_schema import Job


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes everywhere: SQLite stores naive UTC text, PostgreSQL timestamptz."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the ledger: expected a timezone-aware UTC time")
        value = value.astimezone(timezone.utc)
        # SQLite has no time zones; naive UTC text in one fixed format also sorts correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _state_type() -> Enum:
    # Stored as its plain string (VARCHAR), the same word the CLI shows; no database-native enum type.
    return Enum(
        JobState,
        native_enum=False,
        length=16,
        values_callable=lambda states: [s.value for s in states],
        validate_strings=True,
        name="job_state",
    )


def _error_kind_type() -> Enum:
    # The same VARCHAR(32) the first revision made, read back as the protocol's ErrorKind.
    return Enum(ErrorKind, native_enum=False, length=32, values_callable=lambda kinds: [k.value for k in kinds],
                validate_strings=True, create_constraint=False, name="error_kind")


# ---------------------------------------------------------------------------------------------------
# tables


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    """One job's row: what it is (the resolved job, `job`), where it is in its lifecycle, what it produced.

    Rows returned by the Ledger are detached snapshots: changing an attribute changes nothing on disk.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(_state_type())
    priority: Mapped[int] = mapped_column(Integer, default=0)
    manifest_path: Mapped[str] = mapped_column(Text)  # where it was found in the inbox
    work_dir: Mapped[str | None] = mapped_column(Text)
    params_json: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))  # resolved job dict
    input_hash: Mapped[str | None] = mapped_column(String(128), index=True)  # dedupe key
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    last_error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[ErrorKind | None] = mapped_column(_error_kind_type())
    retry_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    phase: Mapped[str | None] = mapped_column(String(32))
    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    timings_json: Mapped[dict[str, float] | None] = mapped_column(JSON(none_as_null=True))  # phase -> s
    gpu_seconds: Mapped[float | None] = mapped_column(Float)
    outputs_json: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    staged_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime())
    waiting_reason: Mapped[str | None] = mapped_column(Text)  # why a staged job is not accepted yet
    # Of `attempts`, those interrupted by a supervisor (or host) death, not the job's fault: not held against
    # max_attempts (revision 0005; the rule is Ledger.recover_interrupted's).
    excused_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Several hosts (revision 0006): the host running it (kept as the last one once it ended; none while it waits)
    # and until when its lease holds, on the database's clock (renewed by its heartbeat; see ledger/leases.py).
    holder: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        # next_query: WHERE state = ? AND (retry_after IS NULL OR retry_after <= ?) ORDER BY ..., priority DESC, created_at
        Index("ix_jobs_claim", "state", "priority", "created_at", "retry_after"),
        Index("ix_jobs_lease", "state", "lease_until"),  # the sweep: running jobs whose lease has expired
    )

    @property
    def attempts_made(self) -> int:
        """Attempts started so far, the running or delivered one included: the one count that `show`,
        `status --json`, the status page and the sidecar all give."""
        return self.attempts + (1 if self.state in RUNNING or self.state == JobState.DONE else 0)

    @property
    def job(self) -> Job:
        """The resolved job (params_json, read strictly); JobDataError when the row has none or a broken one."""
        return Job.from_dict(self.params_json)

    def __repr__(self) -> str:
        return f"<JobRecord {self.id} {self.name!r} {self.state.value}>"


class Event(Base):
    """One line of a job's audit log: a state change (from_state is None for the job's creation)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_state: Mapped[JobState | None] = mapped_column(_state_type())
    to_state: Mapped[JobState] = mapped_column(_state_type())
    message: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str | None] = mapped_column(String(128))  # the host that wrote it (revision 0006); None: a person

    def __repr__(self) -> str:
        frm = self.from_state.value if self.from_state else "-"
        return f"<Event {self.job_id} {frm}->{self.to_state.value} {self.message!r}>"


# Columns callers may set along with a transition; the rest are owned by the ledger itself.
SETTABLE_FIELDS = frozenset(c.name for c in JobRecord.__table__.columns) - {"id", "state", "created_at", "updated_at",
                                                                           "holder", "lease_until"}
