"""Whether the daemon is alive, from what its heartbeat wrote: for `wanbox status`, `show` and the web page.

Reads the hosts and daemon_runs rows and judges them (heartbeat age, and on the daemon's own host whether
its root lock is still held); it must not write anything, and must not import the supervisor.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.hosts import DaemonRun, Host, HostRecords, HostState
from daemon.states import RUNNING, TERMINAL

LOCK_PREFIX = "serve"  # state/serve.<host id>.lock, flock-ed by that host's running supervisor
STALE_FLOOR_SECONDS = 10.0
_FLOCK_LINE = re.compile(r"\bFLOCK\s+\S+\s+\S+\s+-?\d+\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s")


def root_lock(host_id: str) -> str:
    """The lock file of one host's supervisor in the state folder: one per host, so that several hosts can serve a
    shared root while a second supervisor of the same host id is refused."""
    return f"{LOCK_PREFIX}.{re.sub(r'[^A-Za-z0-9._-]', '_', host_id)}.lock"


def stale_after(heartbeat_seconds: float) -> float:
    """A heartbeat older than this means the loop stopped: 3 beats missed, never under 10 s."""
    return max(3.0 * heartbeat_seconds, STALE_FLOOR_SECONDS)


def lock_held(lock_file: Path, locks_text: str | None = None) -> bool | None:
    """Whether some process holds a flock on `lock_file` (from /proc/locks, taking no lock itself);
    None when that cannot be told (no such file, not Linux)."""
    try:
        st = os.stat(lock_file)
        text = Path("/proc/locks").read_text() if locks_text is None else locks_text
    except OSError:
        return None
    for match in _FLOCK_LINE.finditer(text):
        major, minor, inode = int(match[1], 16), int(match[2], 16), int(match[3])
        if (major, minor, inode) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            return True
    return False


@dataclass(frozen=True)
class HostView:
    """One host's row with the verdict: alive, stopped (cleanly), gone (died) or unresponsive (loop stuck)."""

    host: Host
    verdict: str
    reason: str
    age: float  # seconds since its last heartbeat

    @property
    def alive(self) -> bool:
        return self.verdict == "alive"

    def to_json(self, now: datetime) -> dict[str, Any]:
        h = self.host
        pool_age = (now - h.pool_heartbeat_at).total_seconds() if h.pool_heartbeat_at else None
        return {
            "host_id": h.host_id, "hostname": h.hostname, "root": h.root, "pid": h.pid, "version": h.version,
            "state": h.state, "drain": bool(h.drain), "alive": self.alive, "verdict": self.verdict, "reason": self.reason,
            "started_at": h.started_at, "heartbeat_at": h.heartbeat_at, "heartbeat_age_seconds": round(self.age, 1),
            "stale_after_seconds": stale_after(h.heartbeat_seconds), "inbox_outage": h.inbox_outage,
            "quiet_until": h.quiet_until, "web_url": h.web_url, "gpus": h.gpus_json or [],
            "pool": {"state": h.pool_state, "model": h.pool_model, "pid": h.pool_pid, "job": h.current_job,
                     "heartbeat_at": h.pool_heartbeat_at,
                     "heartbeat_age_seconds": None if pool_age is None else round(pool_age, 1)},
        }  # fmt: skip


def judge(host: Host, now: datetime, lock_free: bool = False) -> HostView:
    """The verdict on one host row; `lock_free`: its root's lock is known to be free (checked locally)."""
    age = max(0.0, (now - host.heartbeat_at).total_seconds())
    if host.state == HostState.STOPPED.value:
        return HostView(host, "stopped", f"stopped cleanly at {host.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC", age)
    last = f"last heartbeat {_ago(age)} ago (pid {host.pid})"
    if lock_free:
        return HostView(host, "gone", f"its root lock is free (the process has ended); {last}", age)
    if host.quiet_until is not None and now <= host.quiet_until:
        return HostView(host, "alive", f"{host.state}: a graceful stop, done by {host.quiet_until:%H:%M:%S} UTC "
                                       f"at the latest; {last}", age)  # fmt: skip
    limit = stale_after(host.heartbeat_seconds)
    if age > limit:
        return HostView(host, "gone", f"no heartbeat for {_ago(age)} (more than {limit:g} s; pid {host.pid})", age)
    return HostView(host, "alive", f"heartbeat {_ago(age)} ago", age)


@dataclass(frozen=True)
class Liveness:
    """Every host's view, and which one is this root's daemon (None: no daemon ever ran on this ledger)."""

    hosts: list[HostView]
    daemon: HostView | None
    now: datetime

    @property
    def anyone_alive(self) -> bool:
        return any(v.alive for v in self.hosts)

    def stale(self, job: Any) -> bool:
        """An in-flight job nobody is running: its host (or, for a job that names none, every host) is not alive.
        Another host takes it back once its lease runs out; its own host, when it starts again."""
        if job.state not in RUNNING:
            return False
        holder = getattr(job, "holder", None)
        if holder is None:
            return not self.anyone_alive
        return not any(v.alive and v.host.host_id == holder for v in self.hosts)

    def run_alive(self, run: DaemonRun) -> bool:
        """Whether that daemon run is the live one of its host."""
        return any(v.alive and v.host.run_id == run.id for v in self.hosts)

    def to_json(self) -> dict[str, Any]:
        return {"daemon": self.daemon.to_json(self.now) if self.daemon else None,
                "hosts": [v.to_json(self.now) for v in self.hosts]}

    def render(self) -> str:
        """The lines above `wanbox status`'s job table."""
        if self.daemon is None:
            return "daemon: NONE has ever run on this ledger (start it: wanbox serve / systemctl start wanbox)"
        v, h = self.daemon, self.daemon.host
        if v.verdict == "gone":
            return (f"daemon: GONE on {h.host_id}: {v.reason}; in-flight jobs are STALE (nothing runs them; "
                    "they are recovered when it starts again)")
        lines = [f"daemon: {v.verdict if v.verdict == 'stopped' else h.state} on {h.host_id} (pid {h.pid}, "
                 f"wanbox {h.version}); {v.reason}"]
        if v.alive:
            lines.append(f"pool:   {render_pool(h, self.now)}")
            if h.gpus_json:
                lines.append("gpus:   " + " | ".join(render_gpu(g) for g in h.gpus_json))
            if h.inbox_outage:
                lines.append(f"inbox:  OUTAGE: {h.inbox_outage}")
            if h.web_url:
                lines.append(f"page:   {h.web_url}")
        if len(self.hosts) > 1:  # several hosts share this ledger: each one's line
            lines.append("hosts:")
            lines += [f"  {render_host(view, self.now)}" for view in self.hosts]
        return "\n".join(lines)


def render_host(view: HostView, now: datetime) -> str:
    """One host of a shared ledger: its id, state (or verdict), drain request, warm model, job and last heartbeat."""
    h = view.host
    state = h.state if view.alive else view.verdict.upper() if view.verdict == "gone" else view.verdict
    drain = " (drain requested)" if h.drain and state not in ("drained", "draining") else ""
    return (f"{h.host_id:<24} {state}{drain}; pool {render_pool(h, now)}; "
            f"heartbeat {_ago(view.age)} ago")


def render_pool(h: Host, now: datetime) -> str:
    text = h.pool_state or "stopped"
    if h.pool_model:
        text += f" {h.pool_model}"
    if h.pool_pid:
        text += f" (pid {h.pool_pid})"
    if h.current_job:
        text += f", job {h.current_job}"
    if h.pool_heartbeat_at:
        text += f", last message {_ago((now - h.pool_heartbeat_at).total_seconds())} ago"
    return text


def render_gpu(g: dict[str, Any]) -> str:
    used, total = g["memory_used_bytes"] / 2**30, g["memory_total_bytes"] / 2**30
    return f"{g['index']} {g['name']} {g['utilization_percent']}% {used:.1f}/{total:.1f} GiB"


def read_liveness(engine: Any, root: Path, state_dir: Path, now: datetime | None = None) -> Liveness:
    """Judge every host of the ledger; this root's daemon is the one that served this root from this host
    (else the one heard from last)."""
    now = now or datetime.now(timezone.utc)
    views, mine = [], []
    for host in HostRecords(engine).hosts():
        local = host.hostname == socket.gethostname() and Path(host.root) == Path(root)
        lock_free = local and host.state != HostState.STOPPED.value and lock_held(state_dir / root_lock(host.host_id)) is False
        views.append(judge(host, now, lock_free))
        if local:
            mine.append(views[-1])
    daemon = mine[0] if mine else views[0] if views else None
    return Liveness(views, daemon, now)


def daemon_timeline(records: HostRecords, since: datetime, until: datetime,
                    is_alive: Callable[[DaemonRun], bool]) -> list[tuple[datetime, str]]:
    """(time, text) for daemon starts, clean stops and deaths within [since, until], for a job's timeline.

    A run that neither stopped cleanly nor is alive died at its last heartbeat (the gap is shown until the
    next start, which recovers the job)."""
    entries = []
    for run in records.runs(since, until):
        if since <= run.started_at <= until:
            entries.append((run.started_at, f"daemon started on {run.host_id} (pid {run.pid}, wanbox {run.version})"))
        if run.stopped_at is not None:
            entries.append((run.stopped_at, "daemon stopped cleanly"))
            continue
        later = records.later_run(run)
        if later is not None:
            gap = (later.started_at - run.heartbeat_at).total_seconds()
            entries.append((run.heartbeat_at, f"daemon DIED (pid {run.pid}): last heartbeat here, "
                                              f"started again {_ago(gap)} later"))  # fmt: skip
        elif not is_alive(run):
            entries.append((run.heartbeat_at, f"daemon DIED (pid {run.pid}): last heartbeat here, not running since"))
    return sorted((e for e in entries if since <= e[0] <= until), key=lambda e: e[0])


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:  # "90s", not "2m": short gaps keep their precision
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def job_daemon_events(engine: Any, root: Path, state_dir: Path, job: Any, events: list[Any]) -> list[tuple[datetime, str]]:
    """The daemon starts, stops and deaths during a job's life (until its last event once it has ended)."""
    now = datetime.now(timezone.utc)
    until = events[-1].at if events and job.state in TERMINAL else now
    liveness = read_liveness(engine, root, state_dir, now)
    return daemon_timeline(HostRecords(engine), job.created_at, until, liveness.run_alive)
