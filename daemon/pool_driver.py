"""The warm-pool driver: ready jobs go to the GPU pool (ready -> sampling -> finalizing -> done), its events are
recorded, a finished video is delivered to the outbox, and the pool is switched, relaunched or stopped.

It owns what runs on the pool and since when; it must not touch the inbox, and it acts on the pool only through
WarmPool's public methods (the pool process itself is daemon/pool.py's).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from daemon import jobfiles, protocol
from daemon.config import Config
from daemon.delivery import RESUME_DIR, Delivery
from daemon.diskspace import disk_full_reason, is_disk_full
from daemon.failures import Failures
from daemon.faults import kill_point
from daemon.journal import jlog, log
from daemon.ledger import JobRecord, LeaseLost, Ledger
from daemon.notify import Notifier
from daemon.outbox import Outbox, OutputInvalid, sidecar
from daemon.pool import PoolEvent, WarmPool
from daemon.preprocessing import prepared_inputs
from daemon.states import ErrorKind, JobState, PoolState
from inbox_schema import JobDataError

S = JobState


def resumed(stats: dict[str, Any]) -> str:
    """ " (resumed at step 31 of clip 1 ...)" for the timeline when the pool resumed from a checkpoint."""
    where = stats.get("resumed_from")
    if not isinstance(where, dict):
        return ""
    text = f" (resumed from its checkpoint after step {where.get('step')}"
    text += f" of clip {where['clip'] + 1}" if where.get("clip") else ""
    changed = where.get("layout_changed")
    return text + (f"; on another layout: {', '.join(changed)}" if changed else "") + ")"


class PoolDriver:
    """Feeds the warm pool one job at a time and turns its events into ledger moves and deliveries."""

    def __init__(self, config: Config, ledger: Ledger, failures: Failures, notifier: Notifier,
                 stopping: threading.Event) -> None:
        self.cfg, self.ledger, self.failures, self.notifier, self.stopping = config, ledger, failures, notifier, stopping
        self.pool = WarmPool(config.pool, config.paths.socket, config.outbox.crf)
        self.outbox = Outbox(config.paths.outbox, config.outbox.poster, ledger.host_id)
        self.delivery = Delivery(ledger, self.outbox)
        self.cancel_sent: str | None = None
        self.run_started: dict[str, float] = {}  # job -> when it was sent to the pool (monotonic)

    def open(self) -> None:
        self.pool.open()

    def preload(self, model: str) -> None:
        """Load a model at start-up (systemd's READY=1 then waits until it is warm or has failed to start)."""
        for event in self.pool.launch(model):
            self.on_event(event)

    def poll(self, timeout: float) -> None:
        for event in self.pool.poll(timeout=timeout):
            self.on_event(event)

    # --- sending jobs ----------------------------------------------------------------------------------

    def check_cancellations(self) -> None:
        job_id = self.pool.job
        if job_id is None or self.cancel_sent == job_id:
            return
        if self.ledger.get(job_id).state == S.CANCELLED:
            jlog(logging.INFO, job_id, "cancelled: telling the pool to stop at the next step")
            self.pool.cancel(job_id)
            self.cancel_sent = job_id

    def dispatch(self) -> None:
        """The ledger's rule (ledger.next_query) picks the next ready job; run it, or load its model first."""
        if self.stopping.is_set() or self.pool.state in (PoolState.BUSY, PoolState.LOADING):
            return
        idle = self.pool.state == PoolState.IDLE
        turn = {"model_id": self.pool.model if idle else None, "now": datetime.now(timezone.utc),
                "max_wait": timedelta(seconds=self.cfg.pool.max_switch_wait_seconds),
                "loaded_since": self.pool.ready_at if idle else None, "fresh": idle and self.pool.jobs_run == 0}
        record = self.ledger.peek_next(S.READY, **turn)
        if record is None:
            return
        if idle and self.pool.model == record.model_id:
            self._run(turn)
            return
        if idle:
            jlog(logging.INFO, record.id, "switching the pool from %s to %s", self.pool.model, record.model_id)
            self.pool.stop()
        if self.pool.can_launch():
            for event in self.pool.launch(record.model_id):
                self.on_event(event)

    def _run(self, turn: dict[str, Any]) -> None:
        record = self.ledger.claim_next(S.READY, S.SAMPLING, **turn, if_model=self.pool.model,
                                        message=f"sent to the {self.pool.model} pool")
        if record is None:
            return  # the queue changed since the peek (a cancel, another host): the next tick looks again
        kill_point("state.sampling")
        try:
            job = record.job
        except JobDataError as exc:  # a ledger written by hand or by a broken version: say so, do not loop on it
            self.failures.give_up(record.id, S.SAMPLING, f"its stored job cannot be read ({exc}); submit it again",
                                  ErrorKind.INTERNAL)
            return
        inputs = prepared_inputs(Path(record.work_dir))
        if inputs is None:
            self.ledger.transition(record.id, S.SAMPLING, S.QUEUED, "its prepared inputs are gone: prepare again")
            return
        output = jobfiles.attempt_output(Path(record.work_dir), record.attempts_made, self.ledger.host_id or "local")
        output.unlink(missing_ok=True)  # a stale file from an interrupted attempt must not be delivered
        run = protocol.Run(job=record.id, kind=record.kind, params=job, inputs=inputs, output=str(output),
                           crf=self.cfg.outbox.crf, resume=self._resume(record))
        self.cancel_sent = None
        self.run_started[record.id] = time.monotonic()
        jlog(logging.INFO, record.id, "sampling on the %s pool", self.pool.model)
        if not self.pool.run(run):
            for event in self.pool.died("could not send the job to the worker pool"):
                self.on_event(event)

    def _resume(self, record: JobRecord) -> protocol.Resume | None:
        """Where the pool checkpoints this job's denoising loop (and resumes it after a crash), per [jobs]."""
        jobs = self.cfg.jobs
        if not jobs.resume:
            return None
        return protocol.Resume(dir=str(Path(record.work_dir) / RESUME_DIR),
                               every_steps=jobs.checkpoint_every_steps or None,
                               every_seconds=jobs.checkpoint_every_seconds or None)

    # --- what the pool says ----------------------------------------------------------------------------

    def on_event(self, event: PoolEvent) -> None:
        msg = event.message
        if event.kind == "progress" and isinstance(msg, protocol.Progress):
            self.ledger.record_progress(msg.job, msg.phase, msg.step, msg.total)
        elif event.kind == "done" and isinstance(msg, protocol.Done):
            self.finalize(msg.job, msg)
        elif event.kind == "error" and isinstance(msg, protocol.Error) and event.job is not None:
            self._worker_error(event.job, msg)
        elif event.kind == "died":
            self._pool_died(event)
        elif event.kind == "ready":
            log.info("pool %s warm (load %.1f s)", self.pool.model, self.pool.load_seconds or 0)
            self.notifier.ready()

    def _worker_error(self, job_id: str, msg: protocol.Error) -> None:
        self.run_started.pop(job_id, None)
        state = self.ledger.get(job_id).state
        if msg.kind == ErrorKind.CANCELLED or state != S.SAMPLING:
            if state == S.SAMPLING:  # the worker stopped on its own (shutdown): run it again later
                self.ledger.transition(job_id, S.SAMPLING, S.READY, f"requeued: {msg.message}")
            jlog(logging.INFO, job_id, "the pool stopped it: %s", msg.message)
            return
        self.failures.fail(job_id, S.SAMPLING, msg.message, msg.kind, msg.retryable)

    def _pool_died(self, event: PoolEvent) -> None:
        if not self.notifier.ready_sent:  # the preload failed: start anyway, STATUS says why
            self.notifier.status(f"pool failed to start: {event.reason}")
            self.notifier.ready()
        if event.job is not None:
            self.run_started.pop(event.job, None)
            if self.ledger.get(event.job).state == S.SAMPLING:
                self.failures.fail(event.job, S.SAMPLING, event.reason, ErrorKind.POOL, True)
            return
        # Died while loading: after max_attempts launches in a row, the model cannot run here.
        if self.pool.failures >= self.cfg.jobs.max_attempts and self.pool.model is not None:
            self._fail_model(self.pool.model, event.reason)
            self.pool.failures = 0

    def _fail_model(self, model: str, reason: str) -> None:
        why = (f"the {model} pool failed to start {self.cfg.jobs.max_attempts} times in a row: {reason}. "
               f"Check `wanbox doctor` and `wanbox models verify` (checkpoints in "
               f"{self.cfg.pool.checkpoint_dir(model)}), then `wanbox retry JOB`")
        for record in self.ledger.list(states=[S.READY], limit=None):
            if record.model_id == model:
                self.failures.give_up(record.id, S.READY, why, ErrorKind.POOL)

    # --- delivery ----------------------------------------------------------------------------------------

    def finalize(self, job_id: str, msg: protocol.Done) -> None:
        """Deliver the worker's video; a host that lost the job meanwhile (frozen or cut off past its lease, and
        another host took it) delivers nothing: every step of the delivery is fenced."""
        try:
            self._finalize(job_id, msg)
        except LeaseLost:
            self.run_started.pop(job_id, None)
            jlog(logging.WARNING, job_id, "not delivered here: lease lost (another host took the job over)")

    def _finalize(self, job_id: str, msg: protocol.Done) -> None:
        started = self.run_started.pop(job_id, None)
        stats = msg.stats
        gpu_seconds = stats.get("gpu_seconds")
        fields: dict[str, Any] = {}
        if isinstance(gpu_seconds, (int, float)):
            fields["gpu_seconds"] = float(gpu_seconds)
        if not self.ledger.transition(job_id, S.SAMPLING, S.FINALIZING, f"the worker reported done{resumed(stats)}",
                                      **fields):
            self.delivery.still_held(job_id)  # LeaseLost, said so above; else a person cancelled it
            jlog(logging.INFO, job_id, "output ignored: the job was cancelled meanwhile")
            return
        if started is not None:
            self.ledger.record_timing(job_id, "sampling_wall", time.monotonic() - started)
        for phase, seconds in (stats.get("phases") or {}).items():
            if isinstance(seconds, (int, float)):
                self.ledger.record_timing(job_id, phase, float(seconds))
        kill_point("finalize.begin")
        record = self.ledger.get(job_id)
        video = Path(msg.output)
        hello = self.pool.hello
        pool = {"world_size": hello.world_size, "devices": hello.devices, "parallel": hello.parallel,
                "runtime": hello.runtime} if hello else dict.fromkeys(("world_size", "devices", "parallel", "runtime"))
        document = sidecar(record, stats, pool, self.cfg.pool.checkpoint_dir(record.model_id))
        delivering = time.monotonic()
        self.delivery.still_held(job_id)  # fenced: a host frozen until now must not deliver a second copy
        try:  # exactly once: checked, names recorded, files completed, then done (daemon/delivery.py)
            self.delivery.check(record, video, stats)
            outputs = self.delivery.complete(record, video, self.delivery.plan(record, video, document, stats))
        except (OutputInvalid, OSError) as exc:
            self.delivery.withdraw(record)  # what it published so far goes: no partial delivery stays
            if is_disk_full(exc):  # the host's problem: wait for space, do not spend the job's attempts
                self._wait_for_space(job_id)
                return
            self.failures.fail(job_id, S.FINALIZING, f"delivery failed: {exc}", ErrorKind.OUTPUT, True)
            return
        self.ledger.record_timing(job_id, "deliver", time.monotonic() - delivering)  # for the next jobs' ETAs
        if self.delivery.finish(record, outputs):
            self.failures.ended(job_id)
        jlog(logging.INFO, job_id, "done: %s", outputs["video"])

    def _wait_for_space(self, job_id: str) -> None:
        """The outbox is full: back to ready after a delay, attempts untouched, the reason where status shows it."""
        delay = self.cfg.jobs.backoff_base_seconds
        why = disk_full_reason(self.cfg.paths.outbox, "outbox", delay)
        if self.ledger.transition(job_id, S.FINALIZING, S.READY, f"delivery waits: {why}", last_error=why,
                                  error_kind=ErrorKind.DISK,
                                  retry_after=datetime.now(timezone.utc) + timedelta(seconds=delay)):
            jlog(logging.ERROR, job_id, "%s", why)

    # --- stopping and status -----------------------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Ask the pool to stop; the step in progress may still finish its job, which is then delivered."""
        job = self.pool.job
        if self.pool.state != PoolState.STOPPED and self.pool.pid is not None:
            self.pool.request_shutdown()
            deadline = time.monotonic() + self.cfg.pool.stop_grace_seconds
            while self.pool.job is not None and time.monotonic() < deadline:
                events = self.pool.poll(timeout=0.2)
                for event in events:
                    if event.kind in ("done", "error"):
                        self.on_event(event)
                if any(e.kind == "died" for e in events) or self.pool.state == PoolState.STOPPED:
                    break
        self.pool.stop(grace=max(1.0, self.cfg.pool.stop_grace_seconds / 4))
        if job is not None and self.ledger.get(job).state == S.SAMPLING:
            self.ledger.transition(job, S.SAMPLING, S.READY, f"requeued: {why}")
            jlog(logging.INFO, job, "requeued (%s)", why)

    def close(self) -> None:
        self.pool.close()

    def status_text(self) -> str | None:
        """The pool's line for systemd's STATUS (None when idle, for the supervisor to describe the rest)."""
        pool = self.pool
        if pool.job is not None:
            p = pool.last_progress
            text = f"{pool.model}: job {pool.job} {p.phase if p else 'starting'} {p.step if p else 0}/" \
                   f"{p.total if p else '?'}"
            started = self.run_started.get(pool.job)
            if p is not None and p.phase == "sampling" and p.step and started is not None:
                left = (time.monotonic() - started) / p.step * (p.total - p.step)
                text += f", ETA {left:.0f} s"
            return text
        if pool.state == PoolState.LOADING:
            return f"loading {pool.model}"
        return None
