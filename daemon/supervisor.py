"""The supervisor (`wanbox serve`): one loop that turns, in order, the warm pool's events, intake, the CPU
preparations and the GPU pool's next job; it also holds the root's lock, recovers after a crash and stops cleanly.

It only starts and sequences the parts (daemon/intake.py, preparation.py, pool_driver.py, failures.py); it must
never import torch, never crash on user input, and never delete an input that is the only copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from datetime import timedelta
from typing import Any

from daemon import jobfiles
from daemon.config import Config
from daemon.failures import Failures
from daemon.heartbeat import HEARTBEAT_SECONDS, Heartbeat
from daemon.hosts import HostState
from daemon.intake import Intake
from daemon.journal import jlog, log
from daemon.leases import Leases, has_prepared_inputs
from daemon.ledger import Backoff, Ledger, LedgerError
from daemon.liveness import root_lock
from daemon.notifications import Notifications, job_payload
from daemon.notify import Notifier
from daemon.outbox import software_version
from daemon.pool_driver import PoolDriver
from daemon.preparation import Preparation
from daemon.prune import prune_done
from daemon.web import WebServer

__all__ = ["AlreadyRunning", "Supervisor", "serve"]

PRUNE_EVERY_SECONDS = 3600.0


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this root."""


class Supervisor:
    """Owns the loop; `serve()` runs until SIGTERM/SIGINT, then stops gracefully."""

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.paths = config.paths
        self.stopping = threading.Event()
        self.notifier = Notifier()
        self.ledger: Ledger | None = None
        self.intake: Intake | None = None
        self.preparation: Preparation | None = None
        self.driver: PoolDriver | None = None
        self.notifications: Notifications | None = None
        self.failures: Failures | None = None
        self._pruned_at = -PRUNE_EVERY_SECONDS  # monotonic time of the last prune: the first tick prunes
        self._lock_file: Any = None
        # liveness: this daemon's hosts row, written at least three times per lease (which it renews)
        self.heartbeat = Heartbeat(self.paths.root, software_version(),
                                   interval=min(HEARTBEAT_SECONDS, config.jobs.lease_seconds / 3))
        self.leases: Leases | None = None
        self.web = WebServer(config, self.heartbeat.host_id)  # [web]: status page, JSON API, /metrics

    # --- start and stop --------------------------------------------------------------------------

    def start(self) -> None:
        for path in self.cfg.all_dirs:
            path.mkdir(parents=True, exist_ok=True)
        self._lock_root()
        backoff = Backoff(self.cfg.jobs.backoff_base_seconds, self.cfg.jobs.backoff_cap_seconds)
        self.ledger = Ledger.open(self.paths.ledger, backoff=backoff)
        self.ledger.hold_as(self.heartbeat.host_id, self.cfg.jobs.lease_seconds)  # its claims take leases
        self.heartbeat.web_url = self.web.start()  # None when [web] is off (or its port is taken: logged)
        self.heartbeat.start(self.ledger.engine)
        self.notifications = Notifications(self.ledger, self.cfg.notify)  # webhooks, the post-job command
        self.notifications.start()
        self.failures = failures = Failures(self.ledger, self.paths.work, self.paths.failed, on_end=self.job_ended)
        self.intake = Intake(self.cfg, self.ledger, failures, self.stopping)
        self.preparation = Preparation(self.cfg, self.ledger, failures, self.stopping)
        self.driver = PoolDriver(self.cfg, self.ledger, failures, self.notifier, self.stopping)
        self.leases = Leases(self.ledger, failures)
        self.recover()
        self.preparation.start()
        self.driver.open()
        self.intake.start()
        log.info("wanbox %s serving %s (inbox %s, outbox %s)", software_version(), self.paths.root,
                 self.paths.inbox, self.paths.outbox)
        if self.cfg.pool.preload:
            # READY=1 once the pool is warm (or has failed to start, which STATUS then explains).
            self.driver.preload(self.cfg.pool.preload)
            self.report_status()
        else:
            self.notifier.ready()  # the pool loads on demand, per model: we can take jobs now

    def _lock_root(self) -> None:
        """One supervisor per host id and root: a second one would take this host's jobs as its own and replace the
        pool's socket. Other hosts (other ids) sharing the root through one database lock their own files."""
        lock = self.paths.state / root_lock(self.heartbeat.host_id)
        self._lock_file = open(lock, "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            self._lock_file = None
            raise AlreadyRunning(
                f"another `wanbox serve` (pid {holder}) is running on {self.paths.root} as host "
                f"{self.heartbeat.host_id} ({lock}); stop it first (systemctl stop wanbox), or use another --root "
                "(a second host sharing this root needs its own WANBOX_HOST_ID)"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def recover(self) -> None:
        """After a crash: running jobs back in line, and files in work/ consistent with the ledger."""
        assert self.ledger is not None and self.intake is not None and self.failures is not None
        assert self.driver is not None
        # Writes a crash interrupted (never published): this host's only, the outbox may be shared.
        for gone in jobfiles.remove_temps(self.paths.outbox, host_id=self.heartbeat.host_id):
            log.info("removed the leftover of an interrupted delivery: %s", gone)
        # Exactly once: what a crash interrupted is redone as recorded (the intents) before anything is rerun.
        for job_id in self.driver.delivery.recover():
            jlog(logging.WARNING, job_id, "an interrupted delivery was completed under the names it chose")
            self.failures.ended(job_id)
        for job_id in self.failures.recover():
            self.failures.ended(job_id)
        moved = self.ledger.recover_interrupted(
            has_prepared_inputs=has_prepared_inputs,
            excuse=lambda _job: True,  # this supervisor died while they ran: not their fault (within a limit)
        )
        assert self.leases is not None
        self.leases.settle(moved, "recovered after an interruption")
        self.intake.recover()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the current step, taking no new work", signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def serve(self) -> int:
        self.start()
        try:
            while not self.stopping.is_set():
                self.tick()
        finally:
            self.shutdown()
        return 0

    def tick(self) -> None:
        """One turn of the loop; an unexpected error is logged and the loop goes on (no watchdog ping)."""
        assert self.intake is not None and self.preparation is not None and self.driver is not None
        try:
            self.driver.poll(timeout=self.cfg.jobs.tick_seconds)
            self.intake.tick()
            self.preparation.collect()
            self.driver.check_cancellations()
            if not self.heartbeat.drain:  # `wanbox drain`: no new jobs; what runs finishes
                self.preparation.start_next()
                self.driver.dispatch()
            self.prune_work()
            self.report_status()
            if self.heartbeat.beat(self.driver.pool, self.intake.outage, self.host_state()):
                assert self.leases is not None
                self.leases.beat(self.running_jobs())  # renew ours, take back expired ones of other hosts
            self.notifier.healthy()
        except Exception:
            log.exception("supervisor loop error (continuing)")
            time.sleep(self.cfg.jobs.tick_seconds)

    def running_jobs(self) -> set[str]:
        """The jobs this host really runs now: its CPU preparations and the one on its GPU pool."""
        assert self.preparation is not None and self.driver is not None
        return set(self.preparation.running) | ({self.driver.pool.job} if self.driver.pool.job else set())

    def host_state(self) -> HostState:
        """serving; or, after `wanbox drain`, draining while a job of ours still runs and drained after."""
        assert self.preparation is not None and self.driver is not None
        if not self.heartbeat.drain:
            return HostState.SERVING
        busy = self.preparation.running or self.driver.pool.job is not None
        return HostState.DRAINING if busy else HostState.DRAINED

    def prune_work(self) -> None:
        """Once an hour, with [jobs] prune_after_days set: delete the work folders of long-delivered jobs."""
        days = self.cfg.jobs.prune_after_days
        if days <= 0 or time.monotonic() - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        self._pruned_at = time.monotonic()
        for gone in prune_done(self.ledger, self.paths.work, timedelta(days=days)):
            jlog(logging.INFO, gone.job_id, "work folder pruned (%.1f MiB; delivered over %g days ago)",
                 gone.bytes / 2**20, days)  # fmt: skip

    def shutdown(self) -> None:
        """No new work; the running job finishes its step (or is requeued); the ledger stays consistent."""
        self.notifier.stopping()
        if self.driver is not None and self.intake is not None:
            quiet = self.heartbeat.stopping(self.driver.pool, self.intake.outage, self.cfg.pool.stop_grace_seconds)
            if self.ledger is not None:  # the loop stops beating: our running jobs stay ours until the stop is done
                self.ledger.renew_leases(max(quiet, self.cfg.jobs.lease_seconds))
        if self.intake is not None:
            self.intake.stop()
        if self.driver is not None:
            self.driver.stop("the daemon is stopping")
        if self.preparation is not None:
            self.preparation.stop()
        if self.driver is not None:
            self.driver.close()
        self.web.stop()
        if self.notifications is not None:
            self.notifications.stop()
        self.heartbeat.stop(self.driver.pool if self.driver is not None else None)
        if self.ledger is not None:
            self.ledger.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the root for the next supervisor
            self._lock_file = None
        log.info("stopped")

    def job_ended(self, job_id: str) -> None:
        """Owe the job's notifications (server's and its own), written to the ledger and sent by their threads."""
        assert self.ledger is not None and self.notifications is not None
        record = self.ledger.get(job_id)
        own = record.job.notify if record.params_json else None
        self.notifications.job_ended(job_id, record.state.value, job_payload(record), own)

    # --- status ------------------------------------------------------------------------------------------

    def report_status(self) -> None:
        """systemd's STATUS line: the running job and its step, or what is waiting."""
        assert self.intake is not None and self.preparation is not None and self.driver is not None
        text = self.driver.status_text()
        if text is None:
            text = (f"idle ({self.driver.pool.state}); preparing {len(self.preparation.running)}; "
                    f"staged {len(self.intake.staging)}")
        if self.intake.outage:
            text = f"INBOX OUTAGE ({self.intake.outage}); {text}"
        if self.heartbeat.drain:
            text = f"{self.host_state()} (wanbox drain: taking no new jobs); {text}"
        self.notifier.status(text)


def serve(config: Config) -> int:
    supervisor = Supervisor(config)
    supervisor.install_signal_handlers()
    try:
        return supervisor.serve()
    except LedgerError as exc:
        log.error("cannot use the ledger: %s", exc)
        return 1
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
