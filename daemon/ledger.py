"""The job ledger: every job and every state change, in SQLite (WAL) or PostgreSQL, via SQLAlchemy 2.

Each public method is one short transaction; a state change is a conditional UPDATE plus its event row,
committed together. It must not touch job files, processes or torch: callers do the work, the ledger
records it. SQLite files must live on a local disk (WAL locking does not work over NFS/SMB).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
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
    and_,
    case,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Select

from daemon.states import ALLOWED, RETRY_STATE, RUNNING, TERMINAL, ErrorKind, JobState
from inbox_schema import Job

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32: no i, l, o, u to misread


# ---------------------------------------------------------------------------------------------------
# errors


class LedgerError(Exception):
    """Anything the ledger refuses; the message says what and what to do."""


class IllegalTransition(LedgerError):
    """A move that is not in states.ALLOWED: a bug in the caller, or a user asking the impossible."""

    def __init__(self, job_id: str, from_state: JobState, to_state: JobState, why: str = "") -> None:
        self.job_id, self.from_state, self.to_state = job_id, from_state, to_state
        legal = ", ".join(sorted(s.value for s in ALLOWED[from_state])) or "nothing (final state)"
        text = why or f"{from_state.value} -> {to_state.value} is not a legal move"
        super().__init__(f"job {job_id}: {text} (from {from_state.value} it can go to: {legal})")


class JobNotFound(LedgerError, LookupError):
    """No job has that id or id prefix."""


class AmbiguousJobId(LedgerError, LookupError):
    """An id prefix matches several jobs; the message lists some of them."""


# ---------------------------------------------------------------------------------------------------
# column types


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

    __table_args__ = (
        # next_query: WHERE state = ? AND (retry_after IS NULL OR retry_after <= ?) ORDER BY ..., priority DESC, created_at
        Index("ix_jobs_claim", "state", "priority", "created_at", "retry_after"),
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

    def __repr__(self) -> str:
        frm = self.from_state.value if self.from_state else "-"
        return f"<Event {self.job_id} {frm}->{self.to_state.value} {self.message!r}>"


# Columns callers may set along with a transition; the rest are owned by the ledger itself.
SETTABLE_FIELDS = frozenset(c.name for c in JobRecord.__table__.columns) - {"id", "state", "created_at", "updated_at"}


# ---------------------------------------------------------------------------------------------------
# connecting


@dataclass(frozen=True)
class Backoff:
    """Retry delay after the n-th failed attempt: base * 2**(n-1) seconds, at most cap seconds."""

    base_s: float = 30.0
    cap_s: float = 3600.0

    def delay(self, attempts: int) -> timedelta:
        exponent = min(max(attempts - 1, 0), 30)  # 2**30 * base already exceeds any sane cap
        return timedelta(seconds=min(self.base_s * 2**exponent, self.cap_s))


def database_url(path_or_url: str | Path) -> str:
    """A SQLAlchemy URL from a file path (SQLite) or a URL given as is (e.g. postgresql+psycopg://...)."""
    text = str(path_or_url)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph",
                                  "glusterfs", "fuse.glusterfs", "lustre", "fuse.s3fs", "fuse.rclone"})  # fmt: skip


def network_filesystem(path: Path, mounts: str) -> str | None:
    """The network filesystem type `path` lives on, from /proc/mounts text; None for a local disk."""
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = path == Path(mount_point) or Path(mount_point) in path.parents
        if inside and len(mount_point) >= len(best):  # the deepest mount point holding the path wins
            best, fstype = mount_point, fields[2]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def _check_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    folder = Path(parsed.database).parent
    if not folder.is_dir():
        raise LedgerError(
            f"the ledger's folder {folder} does not exist: create it (it is the daemon's state directory, "
            "on a local disk) or point the ledger setting elsewhere"
        )
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return  # not Linux: nothing to check against
    fstype = network_filesystem(folder.resolve(), mounts)
    if fstype is not None:
        raise LedgerError(
            f"the ledger {parsed.database} is on a network filesystem ({fstype}): SQLite's locking does not "
            "work there and the ledger could be corrupted. Keep the state directory on a local disk (the "
            "inbox and outbox may stay on the share), or use a PostgreSQL URL for a shared queue"
        )


def _make_engine(url: str, busy_timeout_s: float) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # The same patience as SQLite's busy timeout: a statement waiting longer for a lock held by another
        # host fails instead of hanging; and an unreachable server is reported instead of waited on forever.
        args: dict[str, Any] = {"options": f"-c lock_timeout={int(busy_timeout_s * 1000)}"}
        if "connect_timeout" not in parsed.query:
            args["connect_timeout"] = 10
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s})
    event.listen(engine, "connect", _sqlite_on_connect(busy_timeout_s))
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(busy_timeout_s: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (see _sqlite_begin), so the driver must not start transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, and vice versa
        cursor.execute("PRAGMA synchronous = FULL")  # a committed transition survives a power cut
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return on_connect


def _sqlite_begin(conn: Any) -> None:
    # Writers take the write lock at BEGIN (IMMEDIATE), so a read-then-write transaction waits politely in
    # busy_timeout instead of failing with "database is locked" when another process wrote in between.
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def new_job_id(now: datetime) -> str:
    """Sortable and typable: `20261121-203113-k3f9` (UTC time, then 4 random base32 characters)."""
    tail = "".join(secrets.choice(ID_ALPHABET) for _ in range(4))
    return f"{now.astimezone(timezone.utc):%Y%m%d-%H%M%S}-{tail}"


# ---------------------------------------------------------------------------------------------------
# the ledger


class Ledger:
    """The job ledger over one database. Safe to use from several processes at once."""

    def __init__(
        self,
        path_or_url: str | Path,
        *,
        busy_timeout_s: float = 10.0,
        backoff: Backoff | None = None,
        migrate: bool = True,
    ) -> None:
        self.url = database_url(path_or_url)
        self.shown_url = make_url(self.url).render_as_string(hide_password=True)  # for messages and logs
        self.backend = make_url(self.url).get_backend_name()  # "sqlite" or "postgresql"
        _check_sqlite_folder(self.url)
        self.backoff = backoff or Backoff()
        self.engine = _make_engine(self.url, busy_timeout_s)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(writer, expire_on_commit=False)
        if migrate:
            self.upgrade()

    @classmethod
    def open(cls, path_or_url: str | Path, **options: Any) -> Ledger:
        """Open (creating if needed) and upgrade the ledger to the newest schema."""
        return cls(path_or_url, **options)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade(self) -> None:
        """Run Alembic `upgrade head` in one write transaction (concurrent openers wait for each other).

        An up-to-date ledger is only read, so opening it never waits for a busy writer.
        """
        if self._revisions() == {SCHEMA_HEAD}:  # the common case, without importing Alembic (~0.3 s a CLI call)
            return
        from alembic import command
        from alembic.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError

        config = alembic_config(self.url)
        with self.engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
        if current == set(ScriptDirectory.from_config(config).get_heads()):
            return
        with self.engine.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
            if conn.dialect.name == "postgresql":
                # PostgreSQL's counterpart of SQLite's BEGIN IMMEDIATE: hosts opening a new database at once
                # migrate one after the other (the later ones then find it at head and do nothing).
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK_KEY})")
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
            except CommandError as err:
                raise LedgerError(
                    f"cannot upgrade the ledger at {self.shown_url}: {err}. If it was written by a newer wanbox, "
                    "run that version (or restore a backup of the database)"
                ) from err

    def revision(self) -> str | None:
        """The schema revision this database is at (None for an empty one); SCHEMA_HEAD when up to date."""
        return ",".join(sorted(self._revisions())) or None

    def _revisions(self) -> set[str]:
        """The schema revisions Alembic recorded in this database (empty for a new or foreign one)."""
        try:
            with self.engine.connect() as conn:
                return {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}
        except SQLAlchemyError:  # no such table yet
            return set()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    # ---- creating --------------------------------------------------------------------------------

    def add_staged(
        self,
        name: str,
        kind: str,
        manifest_path: str | Path,
        staged_deadline: datetime | None,
        *,
        model_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        input_hash: str | None = None,
        params_json: dict[str, Any] | None = None,
        message: str = "manifest found in the inbox",
        now: datetime | None = None,
    ) -> JobRecord:
        """Record a newly seen manifest as `staged`, with its creation event; returns the new row."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts}: expected at least 1")
        now = now or utcnow()
        for _ in range(8):  # 4 random characters per second: a clash is rare, so just draw again
            job = JobRecord(
                id=new_job_id(now), name=name, kind=kind, model_id=model_id, state=JobState.STAGED,
                priority=priority, manifest_path=str(manifest_path), params_json=params_json,
                input_hash=input_hash, attempts=0, max_attempts=max_attempts, created_at=now,
                updated_at=now, staged_deadline=staged_deadline,
            )  # fmt: skip
            try:
                with self._writing() as session:
                    session.add(job)
                    session.flush()  # the job row before its event (the foreign key)
                    session.add(_event(job.id, now, None, JobState.STAGED, message))
                return job
            except IntegrityError:
                if self._exists(job.id):
                    continue
                raise
        raise LedgerError(f"could not find a free job id for {name!r} at {now:%Y%m%d-%H%M%S}")

    def _exists(self, job_id: str) -> bool:
        with self._reading() as session:
            return session.get(JobRecord, job_id) is not None

    # ---- moving ----------------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        from_state: JobState,
        to_state: JobState,
        message: str,
        *,
        now: datetime | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job iff it is still in `from_state`, setting `fields` and writing the event, atomically.

        Returns False when the job was no longer in `from_state` (someone else moved it first).
        """
        from_state, to_state = JobState(from_state), JobState(to_state)
        _check_edge(job_id, from_state, to_state)
        _check_fields(fields)
        now = now or utcnow()
        with self._writing() as session:
            return _move(session, job_id, from_state, to_state, message, now, fields)

    def peek_next(
        self,
        from_state: JobState,
        kinds: Iterable[str] | None = None,
        model_id: str | None = None,
        now: datetime | None = None,
        *,
        max_wait: timedelta | None = None,
        loaded_since: datetime | None = None,
        fresh: bool = False,
    ) -> JobRecord | None:
        """The job `claim_next` would take now (the same query), without moving or locking anything.

        The supervisor asks this first: it may have to load another model before it can claim the job.
        """
        now = now or utcnow()
        stmt = next_query(JobState(from_state), kinds, now, model_id=model_id, max_wait=max_wait,
                          loaded_since=loaded_since, fresh=fresh, lock=False)  # fmt: skip
        with self._reading() as session:
            return session.scalars(stmt).first()

    def claim_next(
        self,
        from_state: JobState,
        to_state: JobState,
        kinds: Iterable[str] | None = None,
        model_id: str | None = None,
        now: datetime | None = None,
        *,
        max_wait: timedelta | None = None,
        loaded_since: datetime | None = None,
        fresh: bool = False,
        if_model: str | None = None,
        message: str | None = None,
        **fields: Any,
    ) -> JobRecord | None:
        """Take the next job waiting in `from_state` (see `next_query` for the rule) and move it to
        `to_state`, in one transaction; None if none is due.

        `model_id` is the model the pool has loaded, `loaded_since` when it became ready, `fresh` whether
        it has run no job yet; `max_wait` bounds how long a job of another model waits. With `if_model`, the
        job is taken only if it is one for that model (else nothing moves and None is returned): what the
        queue wants next may have changed since `peek_next`, and a pool can only run its own model's jobs.
        """
        from_state, to_state = JobState(from_state), JobState(to_state)
        _check_edge("(next)", from_state, to_state)
        _check_fields(fields)
        now = now or utcnow()
        stmt = next_query(from_state, kinds, now, model_id=model_id, max_wait=max_wait,
                          loaded_since=loaded_since, fresh=fresh, lock=True)  # fmt: skip
        with self._writing() as session:
            job = session.scalars(stmt).first()
            if job is None or (if_model is not None and job.model_id != if_model):
                return None
            text = message or f"taken for {to_state.value}"
            if not _move(session, job.id, from_state, to_state, text, now, fields):
                return None  # cannot happen under the write lock / row lock; kept for safety
            return session.get(JobRecord, job.id, populate_existing=True)

    def record_progress(
        self, job_id: str, phase: str, step: int | None, total: int | None, *, now: datetime | None = None
    ) -> bool:
        """Store "phase, step i of N" for a running job (no event: progress is not a state change)."""
        stmt = (
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.state.in_(RUNNING))
            .values(phase=phase, step=step, total_steps=total, progress_at=now or utcnow())
        )
        with self._writing() as session:
            return session.execute(stmt).rowcount == 1

    def record_timing(self, job_id: str, phase: str, seconds: float) -> None:
        """Add `seconds` to the job's time spent in `phase` (timings_json), read-modify-write under lock."""
        with self._writing() as session:
            job = _get_for_update(session, job_id)
            timings = dict(job.timings_json or {})
            timings[phase] = round(timings.get(phase, 0.0) + seconds, 6)
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(timings_json=timings))

    def record_failure(
        self,
        job_id: str,
        from_state: JobState,
        error: str,
        kind: ErrorKind | str,
        retryable: bool,
        *,
        now: datetime | None = None,
    ) -> JobState | None:
        """Count a failed attempt: back to the retry state after a backoff, or `failed` for good.

        Returns the state the job went to, or None if it was no longer in `from_state` (e.g. cancelled).
        """
        from_state = JobState(from_state)
        now = now or utcnow()
        with self._writing() as session:
            job = _get_for_update(session, job_id)
            if job.state != from_state:
                return None
            attempts = job.attempts + 1
            retry_to = RETRY_STATE.get(from_state)
            fields: dict[str, Any] = {"attempts": attempts, "last_error": error, "error_kind": ErrorKind(kind)}
            if retryable and retry_to is not None and attempts < job.max_attempts:
                delay = self.backoff.delay(attempts)
                fields["retry_after"] = now + delay
                text = (f"attempt {attempts} of {job.max_attempts} failed ({kind}): {error}; "
                        f"retrying in {delay.total_seconds():g} s")  # fmt: skip
                to_state = retry_to
            else:
                to_state = JobState.FAILED
                text = _failure_text(error, kind, retryable and retry_to is not None, attempts, job.max_attempts)
            _check_edge(job_id, from_state, to_state)
            _move(session, job_id, from_state, to_state, text, now, fields)
            return to_state

    def recover_interrupted(
        self,
        now: datetime | None = None,
        *,
        has_prepared_inputs: Callable[[JobRecord], bool] | None = None,
    ) -> list[tuple[str, JobState, JobState]]:
        """At start-up: put jobs left in a running state back in line, counting the attempt.

        preprocessing -> queued; sampling/finalizing -> ready, or queued when `has_prepared_inputs(job)`
        says its prepared inputs are gone. A job out of attempts goes to failed with the reason.
        Returns (job id, from, to) for every job moved.
        """
        now = now or utcnow()
        with self._reading() as session:
            stuck = list(session.scalars(select(JobRecord).where(JobRecord.state.in_(RUNNING)).order_by(JobRecord.created_at)))
        moved = []
        for job in stuck:
            prepared = job.state == JobState.PREPROCESSING or _still_prepared(job, has_prepared_inputs)
            to_state = self._recover_one(job, now, prepared)
            if to_state is not None:
                moved.append((job.id, job.state, to_state))
        return moved

    def _recover_one(self, job: JobRecord, now: datetime, prepared: bool) -> JobState | None:
        attempts = job.attempts + 1
        where = job.state.value
        fields: dict[str, Any] = {"attempts": attempts, "error_kind": ErrorKind.INTERRUPTED}
        if attempts >= job.max_attempts:
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
            text = f"recovered at start-up: {fields['last_error']}; attempt {attempts} of {job.max_attempts}"
            if not prepared:
                text += "; its prepared inputs are gone, so it is prepared again"
        with self._writing() as session:
            return to_state if _move(session, job.id, job.state, to_state, text, now, fields) else None

    def cancel(self, job_id: str, message: str = "cancelled by user", *, now: datetime | None = None) -> JobState:
        """Cancel a job in any non-final state; returns the state it was cancelled from.

        Raises IllegalTransition if it has already ended (done, failed, rejected, cancelled).
        """
        now = now or utcnow()
        for _ in range(5):  # the job may move on between reading its state and cancelling it: look again
            with self._writing() as session:
                job = _resolve(session, job_id)
                if job.state in TERMINAL:
                    why = f"cannot cancel: it has already ended ({job.state.value})"
                    raise IllegalTransition(job.id, job.state, JobState.CANCELLED, why)
                if _move(session, job.id, job.state, JobState.CANCELLED, message, now, {"retry_after": None}):
                    return job.state
        raise LedgerError(f"job {job_id}: its state kept changing while cancelling it; try again")

    def retry(self, job_id: str, message: str = "retried by user", *, now: datetime | None = None) -> JobRecord:
        """Send a failed or cancelled job back to `queued` with a fresh attempt budget; returns the row.

        The old errors stay in the event log. A job cancelled before it was ever accepted (while staged)
        cannot be retried: its files were never taken from the inbox, so it must be resubmitted.
        """
        now = now or utcnow()
        with self._writing() as session:
            job = _resolve(session, job_id)
            _check_edge(job.id, job.state, JobState.QUEUED)
            if not _was_accepted(session, job.id):
                raise IllegalTransition(
                    job.id, job.state, JobState.QUEUED,
                    "it was cancelled before it was accepted; submit the manifest again instead",
                )  # fmt: skip
            fields = {"attempts": 0, "retry_after": None, "last_error": None, "error_kind": None,
                      "phase": None, "step": None, "total_steps": None, "progress_at": None}  # fmt: skip
            _move(session, job.id, job.state, JobState.QUEUED, message, now, fields)
            return session.get(JobRecord, job.id, populate_existing=True)

    # ---- reading ---------------------------------------------------------------------------------

    def get(self, job_id_or_prefix: str) -> JobRecord:
        """The job with that id, else the most recent job of that name, else the only job whose id starts with
        it (as typed in the CLI)."""
        with self._reading() as session:
            return _resolve(session, job_id_or_prefix)

    def find_duplicate(self, input_hash: str, *, exclude_id: str | None = None) -> JobRecord | None:
        """An earlier, non-rejected job with the same content hash: a done one first, else the newest."""
        done_first = case((JobRecord.state == JobState.DONE, 0), else_=1)
        stmt = select(JobRecord).where(JobRecord.input_hash == input_hash, JobRecord.state != JobState.REJECTED)
        if exclude_id is not None:
            stmt = stmt.where(JobRecord.id != exclude_id)
        with self._reading() as session:
            return session.scalars(stmt.order_by(done_first, JobRecord.created_at.desc()).limit(1)).first()

    def find_by_manifest(self, manifest_path: str | Path, states: Iterable[JobState] = (JobState.STAGED,)) -> JobRecord | None:
        """The newest job in `states` recorded for that manifest path (e.g. the staged job of a manifest)."""
        stmt = select(JobRecord).where(JobRecord.manifest_path == str(manifest_path), JobRecord.state.in_(list(states)))
        with self._reading() as session:
            return session.scalars(stmt.order_by(JobRecord.created_at.desc()).limit(1)).first()

    def staged_past_deadline(self, now: datetime | None = None) -> list[JobRecord]:
        """Staged jobs whose deadline has passed (to be rejected with the reason)."""
        stmt = select(JobRecord).where(JobRecord.state == JobState.STAGED, JobRecord.staged_deadline <= (now or utcnow()))
        with self._reading() as session:
            return list(session.scalars(stmt.order_by(JobRecord.created_at)))

    def namesakes(self, job: JobRecord) -> list[JobRecord]:
        """The other jobs of the same name, newest first (a name picks the most recent: say which others exist)."""
        stmt = select(JobRecord).where(JobRecord.name == job.name, JobRecord.id != job.id)
        with self._reading() as session:
            return list(session.scalars(stmt.order_by(JobRecord.created_at.desc(), JobRecord.id.desc()).limit(10)))

    def events(self, job_id: str) -> list[Event]:
        """The job's audit log, oldest first."""
        with self._reading() as session:
            job = _resolve(session, job_id)
            return list(session.scalars(select(Event).where(Event.job_id == job.id).order_by(Event.id)))

    def counts_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 if none)."""
        stmt = select(JobRecord.state, func.count()).group_by(JobRecord.state)
        with self._reading() as session:
            found = dict(session.execute(stmt).all())
        return {state: found.get(state, 0) for state in JobState}

    def audit(self) -> list[str]:
        """Problems in the ledger's own bookkeeping (empty when consistent): used by tests and `doctor`.

        Every job must have a creation event, an unbroken chain of legal events, and its state must be
        the last event's target.
        """
        with self._reading() as session:
            states = dict(session.execute(select(JobRecord.id, JobRecord.state)).all())
            rows = session.execute(select(Event.job_id, Event.from_state, Event.to_state).order_by(Event.id))
            chains: dict[str, list[tuple[JobState | None, JobState]]] = {}
            for job_id, frm, to in rows:
                chains.setdefault(job_id, []).append((frm, to))
        return [p for job_id, state in states.items() for p in _audit_job(job_id, state, chains.get(job_id, []))]

    def list(
        self, states: Iterable[JobState] | None = None, limit: int | None = 100, *, newest_first: bool = True
    ) -> list[JobRecord]:  # noqa: A003 - the CLI verb
        """Jobs, newest first, optionally only those in `states`."""
        stmt = select(JobRecord)
        if states is not None:
            stmt = stmt.where(JobRecord.state.in_([JobState(s) for s in states]))
        order = (JobRecord.created_at.desc(), JobRecord.id.desc()) if newest_first else (JobRecord.created_at, JobRecord.id)
        stmt = stmt.order_by(*order).limit(limit)
        with self._reading() as session:
            return [*session.scalars(stmt)]


# ---------------------------------------------------------------------------------------------------
# the SQL, one small function per statement (all run inside a caller's transaction)


def _still_prepared(job: JobRecord, has_prepared_inputs: Callable[[JobRecord], bool] | None) -> bool:
    if has_prepared_inputs is None:
        return True
    try:
        return bool(has_prepared_inputs(job))
    except Exception:
        # A raising callback must not stop the recovery of the other jobs: preparing again is always safe.
        log.exception("job %s: checking its prepared inputs failed; it will be prepared again", job.id)
        return False


def _event(job_id: str, at: datetime, frm: JobState | None, to: JobState, message: str) -> Event:
    return Event(job_id=job_id, at=at, from_state=frm, to_state=to, message=message)


def _move(
    session: Session,
    job_id: str,
    from_state: JobState,
    to_state: JobState,
    message: str,
    now: datetime,
    fields: dict[str, Any],
) -> bool:
    """UPDATE ... WHERE id = :id AND state = :from, plus the event row; False if the row moved on."""
    stmt = (
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.state == from_state)
        .values(state=to_state, updated_at=now, **fields)
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).rowcount != 1:
        if session.get(JobRecord, job_id) is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return False
    session.add(_event(job_id, now, from_state, to_state, message))
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


def _get_for_update(session: Session, job_id: str) -> JobRecord:
    job = session.scalars(select(JobRecord).where(JobRecord.id == job_id).with_for_update()).first()
    if job is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    return job


def _resolve(session: Session, text: str) -> JobRecord:
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


def _was_accepted(session: Session, job_id: str) -> bool:
    stmt = select(Event.id).where(Event.job_id == job_id, Event.to_state == JobState.QUEUED).limit(1)
    return session.scalars(stmt).first() is not None


def _check_edge(job_id: str, from_state: JobState, to_state: JobState) -> None:
    if to_state not in ALLOWED[from_state]:
        raise IllegalTransition(job_id, from_state, to_state)


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - SETTABLE_FIELDS)
    if unknown:
        raise ValueError(
            f"cannot set job field(s) {', '.join(unknown)} in a transition: expected some of "
            f"{', '.join(sorted(SETTABLE_FIELDS))}"
        )


def _failure_text(error: str, kind: str, retryable: bool, attempts: int, max_attempts: int) -> str:
    if retryable and attempts >= max_attempts:
        return f"gave up after {attempts} of {max_attempts} attempts; the last failed ({kind}): {error}"
    return f"failed ({kind}, not retryable) on attempt {attempts}: {error}"


def _audit_job(job_id: str, state: JobState, chain: list[tuple[JobState | None, JobState]]) -> list[str]:
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


SCHEMA_HEAD = "0003"  # the newest revision in migrations/versions (a test keeps them equal)
UPGRADE_LOCK_KEY = 0x77616E626F78  # "wanbox": the PostgreSQL advisory lock that serialises schema upgrades


def alembic_config(url: str) -> Any:
    """An Alembic Config for this package's migrations; no alembic.ini needed."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config
