"""The Ledger: every job and every state change, each public method one short transaction.

A state change is a conditional UPDATE plus its event row, committed together. It must not touch job
files, processes or torch: callers do the work, the ledger records it."""

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
    case,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.ledger.attempts import charged
from daemon.ledger.claims import IngestClaim
from daemon.ledger.database import (
    SCHEMA_HEAD,
    UPGRADE_LOCK_KEY,
    alembic_config,
    check_sqlite_folder,
    database_url,
    make_engine,
)
from daemon.ledger.errors import IllegalTransition, LedgerError
from daemon.ledger.holding import Holding
from daemon.ledger.leases import Fence
from daemon.ledger.statements import (
    audit_job,
    check_edge,
    check_fields,
    event_row,
    failure_text,
    get_for_update,
    move_state,
    next_query,
    resolve,
    was_accepted,
)
from daemon.ledger.tables import Event, JobRecord, utcnow
from daemon.ledger.takeover import recover_interrupted
from daemon.states import RETRY_STATE, RUNNING, TERMINAL, ErrorKind, JobState

log = logging.getLogger(__name__)
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32: no i, l, o, u to misread


@dataclass(frozen=True)
class Backoff:
    """Retry delay after the n-th failed attempt: base * 2**(n-1) seconds, at most cap seconds."""

    base_s: float = 30.0
    cap_s: float = 3600.0

    def delay(self, attempts: int) -> timedelta:
        exponent = min(max(attempts - 1, 0), 30)  # 2**30 * base already exceeds any sane cap
        return timedelta(seconds=min(self.base_s * 2**exponent, self.cap_s))


def new_job_id(now: datetime) -> str:
    """Sortable and typable: `20261121-203113-k3f9` (UTC time, then 4 random base32 characters)."""
    tail = "".join(secrets.choice(ID_ALPHABET) for _ in range(4))
    return f"{now.astimezone(timezone.utc):%Y%m%d-%H%M%S}-{tail}"


class Ledger(Holding):
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
        check_sqlite_folder(self.url)
        self.backoff = backoff or Backoff()
        self.engine = make_engine(self.url, busy_timeout_s)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(writer, expire_on_commit=False)
        # A supervisor's identity (hold_as): its claims take leases and its writes to running jobs are fenced.
        # None (the CLI, tests of the ledger alone): no leases, nothing fenced.
        self.fence: Fence | None = None
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
        claim: str | None = None,
    ) -> JobRecord | None:
        """Record a newly seen manifest as `staged`, with its creation event; returns the new row.

        With `claim` (the upload's key, daemon/ingest.py), this host claims the upload in the same transaction:
        None when another host claimed it first (it ingests it; nothing was written)."""
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
                    session.add(event_row(job.id, now, None, JobState.STAGED, message, self.host_id))
                    if claim is not None:
                        session.add(IngestClaim(key=claim, host_id=self.host_id or "", job_id=job.id, claimed_at=now))
                        session.flush()  # the unique key decides here, inside this transaction
                return job
            except IntegrityError:
                if self._exists(job.id):
                    continue
                if claim is not None and self.claimed_by(claim) is not None:
                    return None  # another host's: it ingests this upload
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
        check_edge(job_id, from_state, to_state)
        check_fields(fields)
        now = now or utcnow()
        with self._writing() as session:
            return move_state(session, job_id, from_state, to_state, message, now, fields, fence=self.fence)

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
        check_edge("(next)", from_state, to_state)
        check_fields(fields)
        now = now or utcnow()
        stmt = next_query(from_state, kinds, now, model_id=model_id, max_wait=max_wait,
                          loaded_since=loaded_since, fresh=fresh, lock=True)  # fmt: skip
        with self._writing() as session:
            job = session.scalars(stmt).first()
            if job is None or (if_model is not None and job.model_id != if_model):
                return None
            text = message or f"taken for {to_state.value}"
            if not move_state(session, job.id, from_state, to_state, text, now, fields, fence=self.fence):
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
        if self.fence is not None:
            stmt = stmt.where(self.fence.holds())  # a host that lost the job must not report its progress
        with self._writing() as session:
            return session.execute(stmt).rowcount == 1

    def note_waiting(self, job_id: str, reason: str | None) -> bool:
        """Say why a staged job is not accepted yet (None: nothing wrong any more); False once it left staging."""
        stmt = (update(JobRecord).where(JobRecord.id == job_id, JobRecord.state == JobState.STAGED)
                .values(waiting_reason=reason).execution_options(synchronize_session=False))
        with self._writing() as session:
            return session.execute(stmt).rowcount == 1

    def record_timing(self, job_id: str, phase: str, seconds: float) -> None:
        """Add `seconds` to the job's time spent in `phase` (timings_json), read-modify-write under lock; fenced
        (LeaseLost when another host holds the job now)."""
        with self.fenced(job_id) as session:
            job = get_for_update(session, job_id)
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

        Returns the state the job went to, or None if it was no longer in `from_state` (e.g. cancelled) or this
        host no longer holds it (fenced: its lease was taken).
        """
        from_state = JobState(from_state)
        now = now or utcnow()
        with self._writing() as session:
            job = get_for_update(session, job_id)
            if job.state != from_state or (self.fence is not None and from_state in RUNNING
                                           and job.holder != self.fence.host_id):
                return None
            attempts = job.attempts + 1
            retry_to = RETRY_STATE.get(from_state)
            fields: dict[str, Any] = {"attempts": attempts, "last_error": error, "error_kind": ErrorKind(kind)}
            if retryable and retry_to is not None and charged(job, attempts) < job.max_attempts:
                delay = self.backoff.delay(attempts)
                fields["retry_after"] = now + delay
                text = (f"attempt {attempts} of {job.max_attempts} failed ({kind}): {error}; "
                        f"retrying in {delay.total_seconds():g} s")  # fmt: skip
                to_state = retry_to
            else:
                to_state = JobState.FAILED
                text = failure_text(error, kind, retryable and retry_to is not None, charged(job, attempts),
                                    job.max_attempts)
            check_edge(job_id, from_state, to_state)
            move_state(session, job_id, from_state, to_state, text, now, fields, fence=self.fence)
            return to_state

    def recover_interrupted(
        self,
        now: datetime | None = None,
        *,
        has_prepared_inputs: Callable[[JobRecord], bool] | None = None,
        excuse: Callable[[JobRecord], bool] | None = None,
    ) -> list[tuple[str, JobState, JobState]]:
        """At start-up: this host's jobs left in a running state back in line, counting the attempt (the rule is
        daemon/ledger/takeover.py's). Returns (job id, from, to) for every job moved."""
        return recover_interrupted(self, now or utcnow(), has_prepared_inputs, excuse)

    def cancel(self, job_id: str, message: str = "cancelled by user", *, now: datetime | None = None) -> JobState:
        """Cancel a job in any non-final state; returns the state it was cancelled from.

        Raises IllegalTransition if it has already ended (done, failed, rejected, cancelled).
        """
        now = now or utcnow()
        for _ in range(5):  # the job may move on between reading its state and cancelling it: look again
            with self._writing() as session:
                job = resolve(session, job_id)
                if job.state in TERMINAL:
                    why = f"cannot cancel: it has already ended ({job.state.value})"
                    raise IllegalTransition(job.id, job.state, JobState.CANCELLED, why)
                if move_state(session, job.id, job.state, JobState.CANCELLED, message, now, {"retry_after": None}):
                    return job.state
        raise LedgerError(f"job {job_id}: its state kept changing while cancelling it; try again")

    def retry(self, job_id: str, message: str = "retried by user", *, now: datetime | None = None) -> JobRecord:
        """Send a failed or cancelled job back to `queued` with a fresh attempt budget; returns the row.

        The old errors stay in the event log. A job cancelled before it was ever accepted (while staged)
        cannot be retried: its files were never taken from the inbox, so it must be resubmitted.
        """
        now = now or utcnow()
        with self._writing() as session:
            job = resolve(session, job_id)
            check_edge(job.id, job.state, JobState.QUEUED)
            if not was_accepted(session, job.id):
                raise IllegalTransition(
                    job.id, job.state, JobState.QUEUED,
                    "it was cancelled before it was accepted; submit the manifest again instead",
                )  # fmt: skip
            fields = {"attempts": 0, "excused_attempts": 0, "retry_after": None, "last_error": None,
                      "error_kind": None, "phase": None, "step": None, "total_steps": None, "progress_at": None}  # fmt: skip
            move_state(session, job.id, job.state, JobState.QUEUED, message, now, fields)
            return session.get(JobRecord, job.id, populate_existing=True)

    # ---- reading ---------------------------------------------------------------------------------

    def get(self, job_id_or_prefix: str) -> JobRecord:
        """The job with that id, else the most recent job of that name, else the only job whose id starts with
        it (as typed in the CLI)."""
        with self._reading() as session:
            return resolve(session, job_id_or_prefix)

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

    def postpone_staged(self, by: timedelta, job_id: str | None = None, floor: datetime | None = None) -> int:
        """Move staged deadlines (one job's, or all) later by `by`, and to at least `floor`: time the host took
        away (an inbox outage, a full disk) is not the upload's. Returns how many moved."""
        stmt = select(JobRecord).where(JobRecord.state == JobState.STAGED, JobRecord.staged_deadline.is_not(None))
        if job_id is not None:
            stmt = stmt.where(JobRecord.id == job_id)
        moved = 0
        with self._writing() as session:
            for job in session.scalars(stmt.with_for_update()):
                deadline = job.staged_deadline + by
                job.staged_deadline = max(deadline, floor) if floor is not None else deadline
                moved += 1
        return moved

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
            job = resolve(session, job_id)
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
        return [p for job_id, state in states.items() for p in audit_job(job_id, state, chains.get(job_id, []))]

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
