"""Notifications when a job ends: what is owed is written to the ledger at once, then sender threads deliver it
(webhooks retried with exponential backoff until a deadline, the post-job command run once), recording each try.

It must never block or break the supervisor loop: `job_ended` only writes rows and never raises, and a
receiver that is down, slow or hanging, or a command that fails or hangs, changes nothing about the job.
"""

from __future__ import annotations

import json
import logging
import queue
import shlex
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from daemon import hooks, webhooks
from daemon.config import NotifySettings
from daemon.deliveries import COMMAND, DELIVERED, FAILED, PENDING, WEBHOOK, DeliveryStore, Notification, Owed
from daemon.ledger import Ledger, utcnow
from inbox_schema.notify import NotifyTargets as JobTargets
from inbox_schema.notify import webhook_url_problem

log = logging.getLogger("wanbox.notifications")
LEASE_MARGIN = timedelta(seconds=30)  # an attempt in flight stays claimed this much longer than its timeout


def job_payload(job: Any) -> dict[str, Any]:
    """The job's facts a receiver needs, from a ledger row (the sidecar's essentials, the error for failures)."""
    state = getattr(job.state, "value", job.state)
    return {
        "job_id": job.id, "name": job.name, "kind": job.kind, "model_id": job.model_id, "state": state,
        "outputs": dict(job.outputs_json or {}), "seed": job.job.seed if job.params_json else None,
        "timings_seconds": dict(job.timings_json or {}), "gpu_seconds": job.gpu_seconds,
        "error": None if state == "done" else job.last_error,
        "error_kind": None if state == "done" else job.error_kind,
        "created_at": job.created_at.isoformat(), "finished_at": job.updated_at.isoformat(),
    }  # fmt: skip


class Notifications:
    """The server's and each job's notifications, delivered by `senders` threads once `start()`ed.

    The supervisor calls `job_ended` once when a job reaches done, failed or rejected; deliveries owed
    by an earlier run (the daemon stopped or died meanwhile) are sent after `start()` too.
    """

    def __init__(self, ledger: Ledger, settings: NotifySettings, *, senders: int = 4, poll_seconds: float = 5.0,
                 agent: str = "wanbox", lease_margin: timedelta = LEASE_MARGIN) -> None:  # fmt: skip
        self.settings = settings
        self.lease_margin = lease_margin
        self.store = DeliveryStore(ledger)
        self.agent = agent
        self.poll_seconds = poll_seconds  # also picks up what another host sharing the ledger added
        self._senders = senders
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._queue: queue.Queue[Notification | None] = queue.Queue()
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # --- what the supervisor calls ----------------------------------------------------------------

    def job_ended(self, job_id: str, state: str, payload: dict[str, Any],
                  per_job: JobTargets | None = None) -> list[int]:  # fmt: skip
        """Record the notifications owed for this end (ids returned) and wake the senders; never raises."""
        try:
            owed = self.owed(state, per_job)
            ids = self.store.add(job_id, state, payload, owed) if owed else []
        except Exception:
            log.exception("job %s: could not record its %s notifications; none will be sent", job_id, state,
                          extra={"job": job_id})  # fmt: skip
            return []
        self._wake.set()
        return ids

    def owed(self, state: str, per_job: JobTargets | None) -> list[Owed]:
        """Who is told about a job ending in `state`: server URLs, the job's URLs (each URL once), the command."""
        s = self.settings
        urls = [("server", url) for url in s.urls if state in s.events]
        if per_job is not None and s.job_urls and state in per_job.events:
            urls += [("job", url) for url in per_job.urls]
        owed: list[Owed] = []
        for scope, url in urls:
            if all(o.target != url for o in owed):  # named by the server and the job: sent once
                owed.append(Owed(WEBHOOK, scope, url))
        if s.command and state in s.command_events:
            owed.append(Owed(COMMAND, "server", json.dumps(list(s.command))))
        return owed

    def start(self) -> None:
        """Start the dispatcher and the sender threads (daemon threads: they never keep the process alive)."""
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._dispatch_loop, name="notify-dispatch", daemon=True)]
        self._threads += [threading.Thread(target=self._send_loop, name=f"notify-send-{n}", daemon=True)
                          for n in range(self._senders)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; wait up to `grace` s for attempts in flight. One still running then (a hanging
        receiver, a slow command) is left to its thread, and is due again after a restart (its lease expires)."""
        self._stopping.set()
        self._wake.set()
        for _ in range(self._senders):
            self._queue.put(None)
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    # --- the threads ----------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._dispatch()
                wait = self._until_next()
            except Exception:  # the ledger busy or down: try again later, nothing is lost
                log.exception("notifications: dispatching failed; trying again in %g s", self.poll_seconds)
                wait = self.poll_seconds
            self._wake.wait(wait)
            self._wake.clear()

    def _dispatch(self) -> None:
        with self._lock:
            free, busy = self._senders - len(self._in_flight), frozenset(self._in_flight)
        if free <= 0:
            return
        lease = {WEBHOOK: timedelta(seconds=self.settings.timeout_seconds) + self.lease_margin,
                 COMMAND: timedelta(seconds=self.settings.command_timeout_seconds + hooks.TERM_GRACE_SECONDS)
                 + self.lease_margin}  # fmt: skip
        for row in self.store.claim_due(utcnow(), lease, free, busy):
            with self._lock:
                self._in_flight.add(row.id)
            self._queue.put(row)

    def _until_next(self) -> float:
        due = self.store.next_due()
        if due is None:
            return self.poll_seconds
        return min(self.poll_seconds, max(0.0, (due - utcnow()).total_seconds()))

    def _send_loop(self) -> None:
        while True:
            row = self._queue.get()
            if row is None:
                return
            try:
                self._deliver(row)
            except Exception:  # a bug here must not kill the sender: the lease makes the row due again
                log.exception("notification %s for job %s: delivering failed", row.id, row.job_id)
            finally:
                with self._lock:
                    self._in_flight.discard(row.id)
                self._wake.set()  # a sender is free: the dispatcher may hand out the next one

    # --- one attempt ----------------------------------------------------------------------------------

    def _deliver(self, row: Notification) -> None:
        at = utcnow()
        if row.channel == COMMAND:
            outcome: Any = hooks.run_command(json.loads(row.target), hooks.job_environment(row.event, row.payload),
                                             self.settings.command_timeout_seconds)  # fmt: skip
            state, result, retry_at = (DELIVERED if outcome.ok else FAILED), outcome.detail, None
        else:
            outcome = self._post(row, at)
            state, result, retry_at = self._after_webhook(row, outcome, at)
        self.store.record(row.id, at, outcome.seconds, outcome.status, outcome.detail, state=state, result=result,
                          retry_at=retry_at)  # fmt: skip
        level = logging.INFO if state != FAILED else logging.WARNING
        log.log(level, "job %s: %s %s: %s", row.job_id, row.channel, describe_target(row), result,
                extra={"job": row.job_id})  # fmt: skip

    def _post(self, row: Notification, at: datetime) -> webhooks.Outcome:
        timestamp = int(at.timestamp())
        data = webhooks.body(row.event, row.id, row.payload, timestamp)
        header_values = webhooks.headers(row.event, row.id, timestamp, data, self.settings.secret, self.agent)
        return webhooks.post(row.target, data, header_values, self.settings.timeout_seconds)

    def _after_webhook(self, row: Notification, outcome: webhooks.Outcome,
                       at: datetime) -> tuple[str, str, datetime | None]:  # fmt: skip
        """Delivered on a 2xx; otherwise retried after base * 2**(n-1) s (at most cap), until the deadline."""
        if outcome.ok:
            return DELIVERED, f"HTTP {outcome.status}", None
        problem = webhook_url_problem(row.target)
        if problem:  # a manifest's bad URL: no retry can fix it
            return FAILED, f"not sent: {problem}", None
        s, tries = self.settings, row.attempts + 1
        deadline = row.created_at + timedelta(seconds=s.give_up_after_seconds)
        now = at + timedelta(seconds=outcome.seconds)
        if now >= deadline:
            age = (now - row.created_at).total_seconds()
            return FAILED, f"gave up after {tries} attempts over {age:.0f} s; the last: {outcome.detail}", None
        delay = min(s.retry_base_seconds * 2 ** min(tries - 1, 30), s.retry_cap_seconds)
        retry_at = min(now + timedelta(seconds=delay), deadline)
        return PENDING, f"{outcome.detail}; retrying in {(retry_at - now).total_seconds():.3g} s", retry_at


def describe_target(row: Notification) -> str:
    if row.channel == COMMAND:
        return shlex.join(json.loads(row.target))
    return webhooks.display_url(row.target)


def notification_lines(ledger: Ledger, job_id: str) -> list[str]:
    """What `wanbox show` prints about a job's notifications, one line per notification and attempt."""
    lines = []
    for row, tries in DeliveryStore(ledger).for_job(job_id):
        verb = {DELIVERED: "notified" if row.channel == WEBHOOK else "ran", FAILED: "failed",
                PENDING: "pending"}.get(row.state, row.state)  # fmt: skip
        lines.append(f"{verb} ({row.event}, {row.scope}) {describe_target(row)}: {row.last_result or 'not tried yet'}")
        for t in tries:
            lines.append(f"    {t.at:%Y-%m-%d %H:%M:%S}  {t.seconds:.2f} s  {t.detail[:300]}")
    return lines
