"""Liveness records in the ledger's database: one `hosts` row per daemon host, one `daemon_runs` row per start.

Tables and their SQL only, each method one short transaction; it must not decide what a heartbeat's age
means (daemon/liveness.py does) and must not touch jobs. Several supervisors on one PostgreSQL each own
the rows of their own host_id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, String, Text, false, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from daemon.ledger import Base, UTCDateTime


class HostState(str, Enum):
    """A daemon's lifecycle, as stored in hosts.state and shown by `wanbox status`."""

    STARTING = "starting"  # recovering the ledger, starting the pool (before the loop)
    SERVING = "serving"  # the loop runs
    DRAINING = "draining"  # stopping, or drained while a job still runs: it finishes first
    STOPPING = "stopping"  # stopping: nothing runs any more, resources are released
    DRAINED = "drained"  # `wanbox drain`: takes no new jobs and runs none (the loop still beats)
    STOPPED = "stopped"  # a clean stop (a crash leaves the last state and an old heartbeat instead)

    def __str__(self) -> str:
        return self.value


class Host(Base):
    """What one host's daemon last said about itself (rewritten by every heartbeat)."""

    __tablename__ = "hosts"

    host_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    root: Mapped[str] = mapped_column(Text)  # the data root it serves
    run_id: Mapped[int | None] = mapped_column(Integer)  # its current daemon_runs row
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # a HostState value
    heartbeat_seconds: Mapped[float] = mapped_column(Float)  # how often it promised to write this row
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    quiet_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # a graceful stop may not beat until then
    pool_state: Mapped[str | None] = mapped_column(String(16))  # stopped, loading, idle, busy
    pool_model: Mapped[str | None] = mapped_column(String(64))
    pool_pid: Mapped[int | None] = mapped_column(Integer)
    current_job: Mapped[str | None] = mapped_column(String(32))
    pool_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # the pool's last message
    gpus_json: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))  # NVML, or []
    inbox_outage: Mapped[str | None] = mapped_column(Text)  # why the inbox cannot be read; None when fine
    web_url: Mapped[str | None] = mapped_column(Text)  # where its status page listens, if it serves one
    # `wanbox drain` asked it to take no new jobs (revision 0006): it finishes what it runs, then idles.
    drain: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class DaemonRun(Base):
    """One start of a daemon: when it started, last beat and stopped (None after a crash), pool counters."""

    __tablename__ = "daemon_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(String(128), index=True)
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # set by a clean stop only
    pool_launches: Mapped[int] = mapped_column(Integer, default=0)
    pool_deaths: Mapped[int] = mapped_column(Integer, default=0)  # unplanned exits, hangs, failed starts


HOST_FIELDS = frozenset(c.name for c in Host.__table__.columns) - {"host_id"}


class HostRecords:
    """The hosts and daemon_runs tables over the ledger's engine (safe from any thread or process)."""

    def __init__(self, engine: Engine) -> None:
        self._read = sessionmaker(engine, expire_on_commit=False)
        # The ledger's write mode: SQLite takes the write lock at BEGIN, so writers queue politely.
        self._write = sessionmaker(engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False)

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    # ---- a daemon's own rows ------------------------------------------------------------------------

    def begin_run(self, host_id: str, now: datetime, **fields: Any) -> int:
        """A new daemon_runs row and this host's row (created or taken over); returns the run id."""
        _check(fields)
        with self._writing() as session:
            run = DaemonRun(host_id=host_id, pid=fields["pid"], version=fields["version"], started_at=now,
                            heartbeat_at=now, pool_launches=0, pool_deaths=0)
            session.add(run)
            session.flush()
            values = {**fields, "run_id": run.id, "started_at": now, "heartbeat_at": now}
            host = session.get(Host, host_id)
            if host is None:
                session.add(Host(host_id=host_id, **values))
            else:
                for key, value in values.items():
                    setattr(host, key, value)
            return run.id

    def beat(self, host_id: str, run_id: int, now: datetime, launches: int, deaths: int, **fields: Any) -> bool:
        """One heartbeat: the host row's live fields and the run's last beat and pool counters; returns whether
        `wanbox drain` asks this host to take no new jobs."""
        _check(fields)
        with self._writing() as session:
            session.execute(update(Host).where(Host.host_id == host_id).values(heartbeat_at=now, **fields))
            session.execute(update(DaemonRun).where(DaemonRun.id == run_id)
                            .values(heartbeat_at=now, pool_launches=launches, pool_deaths=deaths))
            return bool(session.scalar(select(Host.drain).where(Host.host_id == host_id)))

    def set_drain(self, host_id: str, drain: bool) -> bool:
        """`wanbox drain [--undo]`: ask a host to take no new jobs (or to take them again); False: no such host."""
        with self._writing() as session:
            stmt = update(Host).where(Host.host_id == host_id).values(drain=drain)
            return bool(session.execute(stmt.execution_options(synchronize_session=False)).rowcount)

    def end_run(self, host_id: str, run_id: int, now: datetime, **fields: Any) -> None:
        """A clean stop: the run gets its stopped_at, the host row says stopped."""
        _check(fields)
        with self._writing() as session:
            session.execute(update(Host).where(Host.host_id == host_id)
                            .values(state=HostState.STOPPED.value, heartbeat_at=now, current_job=None, **fields))
            session.execute(update(DaemonRun).where(DaemonRun.id == run_id).values(heartbeat_at=now, stopped_at=now))

    # ---- reading ------------------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        """Every host that ever ran a daemon on this ledger, the most recently heard from first."""
        with self._reading() as session:
            return list(session.scalars(select(Host).order_by(Host.heartbeat_at.desc(), Host.host_id)))

    def runs(self, since: datetime, until: datetime | None = None) -> list[DaemonRun]:
        """Daemon runs alive at some moment in [since, until], oldest first (for a job's timeline)."""
        stmt = select(DaemonRun).where(DaemonRun.heartbeat_at >= since)
        if until is not None:
            stmt = stmt.where(DaemonRun.started_at <= until)
        with self._reading() as session:
            return list(session.scalars(stmt.order_by(DaemonRun.started_at, DaemonRun.id)))

    def later_run(self, run: DaemonRun) -> DaemonRun | None:
        """The next run of the same host after `run` (the restart that followed it), if any."""
        stmt = (select(DaemonRun).where(DaemonRun.host_id == run.host_id, DaemonRun.id > run.id)
                .order_by(DaemonRun.id).limit(1))
        with self._reading() as session:
            return session.scalars(stmt).first()

    def pool_totals(self, host_id: str | None = None) -> tuple[int, int]:
        """(pool launches, pool deaths) summed over every run (of one host): counters that survive restarts."""
        stmt = select(func.coalesce(func.sum(DaemonRun.pool_launches), 0),
                      func.coalesce(func.sum(DaemonRun.pool_deaths), 0))
        if host_id is not None:
            stmt = stmt.where(DaemonRun.host_id == host_id)
        with self._reading() as session:
            launches, deaths = session.execute(stmt).one()
        return int(launches), int(deaths)


def _check(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - HOST_FIELDS)
    if unknown:
        raise ValueError(f"unknown host field(s) {', '.join(unknown)}: expected some of {', '.join(sorted(HOST_FIELDS))}")
