"""The supervisor's heartbeat: writes this daemon's hosts row and daemon_runs row from its own loop.

Called only from the supervisor's thread (a beat that stops coming means the loop stopped), throttled to
one short write every few seconds. It must never raise into the loop and never judge liveness itself
(daemon/liveness.py reads what it wrote).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from daemon.gpus import GpuProbe
from daemon.hosts import HostRecords, HostState

log = logging.getLogger("wanbox.heartbeat")
HEARTBEAT_SECONDS = 2.0  # how often the loop writes its row (liveness.stale_after: 3x this, at least 10 s)
CHANGE_SECONDS = 0.5  # news from the pool (state, job, a launch or death) is written this soon, not a whole interval later
COMPLAIN_EVERY_SECONDS = 60.0  # a failing heartbeat write is logged at most this often


def default_host_id(root: Path) -> str:
    """`<hostname>-<8 hex of the root path>`: one id per daemon root on a host, stable across restarts;
    WANBOX_HOST_ID names it instead (e.g. hosts sharing one PostgreSQL ledger under names of your own)."""
    if os.environ.get("WANBOX_HOST_ID"):
        return os.environ["WANBOX_HOST_ID"]
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def pool_fields(pool: Any) -> dict[str, Any]:
    """The hosts row's view of a daemon.pool.WarmPool (state, model, pid, job, its last message)."""
    return {"pool_state": str(pool.state), "pool_model": pool.model, "pool_pid": pool.pid, "current_job": pool.job,
            "pool_heartbeat_at": pool.last_message_at}  # fmt: skip


class Heartbeat:
    """This daemon's liveness rows: `start()` once, `beat()` every tick (throttled), `stop()` on a clean stop."""

    def __init__(self, root: Path, version: str, *, host_id: str | None = None,
                 interval: float = HEARTBEAT_SECONDS, gpus: GpuProbe | None = None) -> None:
        self.records: HostRecords | None = None  # set by start(): the ledger is opened after construction
        self.root = Path(root)
        self.version = version
        self.host_id = host_id or default_host_id(self.root)
        self.interval = interval
        self.gpus = gpus or GpuProbe()
        self.web_url: str | None = None  # set by the web server once it listens
        self.run_id: int | None = None
        self._last_at = -float("inf")  # monotonic time of the last write
        self._last_state: HostState | None = None
        self._last_pool: tuple[Any, ...] = ()
        self._complained_at = -float("inf")
        self.drain = False  # `wanbox drain` asked this host to take no new jobs (read back by every beat)

    def start(self, engine: Any) -> None:
        """A new run on the ledger's engine: the host row says `starting` (before recovery and the pool)."""
        self.records = HostRecords(engine)
        now = _utcnow()
        self.run_id = self.records.begin_run(
            self.host_id, now, hostname=socket.gethostname(), root=str(self.root), pid=os.getpid(),
            version=self.version, state=HostState.STARTING.value, heartbeat_seconds=self.interval,
            quiet_until=None, pool_state="stopped", pool_model=None, pool_pid=None, current_job=None,
            pool_heartbeat_at=None,
            gpus_json=self.gpus.read(), inbox_outage=None, web_url=self.web_url,
        )  # fmt: skip
        self._wrote(HostState.STARTING)
        log.info("heartbeat: host %s, run %d, every %g s", self.host_id, self.run_id, self.interval)

    def beat(self, pool: Any, outage: str | None, state: HostState = HostState.SERVING) -> bool:
        """Write the row if `interval` seconds passed or the state changed; a failed write is logged, not raised.
        True when it wrote (the caller renews its leases at the same pace)."""
        if self.run_id is None or self.records is None:
            return False
        since = time.monotonic() - self._last_at
        changed = state != self._last_state or (_pool_key(pool) != self._last_pool and since >= CHANGE_SECONDS)
        if not changed and since < self.interval:
            return False
        try:
            self.drain = self.records.beat(self.host_id, self.run_id, _utcnow(), pool.launches, pool.deaths,
                                           state=state.value, gpus_json=self.gpus.read(), inbox_outage=outage or None,
                                           web_url=self.web_url, **pool_fields(pool))  # fmt: skip
        except SQLAlchemyError as exc:  # the ledger is busy or gone: the loop goes on, status will say stale
            self._complain(exc)
            return False
        self._wrote(state)
        self._last_pool = _pool_key(pool)
        return True

    def stopping(self, pool: Any, outage: str | None, stop_grace_seconds: float) -> float:
        """A graceful stop begins: `draining` (a job finishes its step) or `stopping`, and a promise of silence
        while the pool and the CPU preparations wind down (the loop, and so the heartbeat, no longer turns); returns
        how long that silence may last, in seconds."""
        if self.run_id is None or self.records is None or pool is None:
            return 0.0
        # The pool's drain (grace), its exit (grace / 4 + kill), the preparations (<= 30 s), with room to spare.
        quiet = timedelta(seconds=1.5 * stop_grace_seconds + 45.0)
        state = HostState.DRAINING if pool.job is not None else HostState.STOPPING
        try:
            self.records.beat(self.host_id, self.run_id, _utcnow(), pool.launches, pool.deaths, state=state.value,
                              quiet_until=_utcnow() + quiet, inbox_outage=outage or None, **pool_fields(pool))
        except SQLAlchemyError as exc:
            self._complain(exc)
        return quiet.total_seconds()

    def stop(self, pool: Any) -> None:
        """A clean stop: the run ends and the host row says `stopped`."""
        if self.run_id is None or self.records is None:
            return
        fields = {} if pool is None else {"pool_state": str(pool.state), "pool_pid": pool.pid, "pool_model": pool.model}
        try:
            self.records.end_run(self.host_id, self.run_id, _utcnow(), quiet_until=None, gpus_json=[], **fields)
        except SQLAlchemyError as exc:
            self._complain(exc)
        self.gpus.close()
        self.run_id = None

    def _wrote(self, state: HostState) -> None:
        self._last_at, self._last_state = time.monotonic(), state

    def _complain(self, exc: Exception) -> None:
        if time.monotonic() - self._complained_at >= COMPLAIN_EVERY_SECONDS:
            self._complained_at = time.monotonic()
            log.warning("heartbeat: cannot write the hosts row: %s (status will show this daemon as stale)", exc)


def _pool_key(pool: Any) -> tuple[Any, ...]:
    return (str(pool.state), pool.model, pool.job, pool.launches, pool.deaths)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)
