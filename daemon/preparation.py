"""The CPU preparation pool: queued jobs are prepared in separate processes (queued -> preprocessing -> ready)
while the GPUs sample, with progress polled into the ledger and stuck preparations killed.

It owns the process pool and which job each preparation is; it must not touch the inbox or the GPU pool, and a
stuck or dying preparation must never block the supervisor's loop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from daemon import jobfiles
from daemon.config import Config
from daemon.failures import Failures
from daemon.faults import kill_point
from daemon.journal import jlog, log
from daemon.ledger import JobRecord, Ledger
from daemon.preprocessing import PreprocessFailed, PrepSettings, die_with, prepare_job, read_progress, warm_up
from daemon.states import ErrorKind, JobState

S = JobState


class CpuPool:
    """A process pool whose processes can be killed: each tells its pid on start (the executor keeps them private)."""

    def __init__(self, workers: int) -> None:
        # spawn, not fork: the supervisor has threads (watcher, pool reader) that fork would copy mid-state.
        context = multiprocessing.get_context("spawn")
        self._pids = context.SimpleQueue()
        self._killed = context.Event()  # set by kill(): a process that starts after it must not take work
        self._known: set[int] = set()
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_process,
                                            initargs=(os.getpid(), self._pids, self._killed))
        self.executor.submit(warm_up)  # start the processes now, not when the first job is waiting

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        return self.executor.submit(fn, *args)

    def pids(self) -> set[int]:
        """The pool's processes that have started so far."""
        while not self._pids.empty():
            self._known.add(self._pids.get())
        return set(self._known)

    def kill(self) -> None:
        """Shut down without waiting: a stuck preparation must not hold anything up.

        Every process is either known here and killed, or still starting (importing, after spawn): those see
        the flag, set before the pids are read, right after telling their pid, and exit without taking work. A
        late one left running could run a job already put back in line, or block for ever on a queue lock that
        a killed sibling held, and then hang the supervisor's exit (the executor joins its processes)."""
        self._killed.set()
        pids = self.pids()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(pid, signal.SIGKILL)


def _start_process(parent_pid: int, pids: Any, killed: Any) -> None:
    die_with(parent_pid)
    pids.put(os.getpid())
    if killed.is_set():  # the pool was killed while this process started: CpuPool.kill says why
        os._exit(0)


@dataclass
class Preparing:
    """One running preparation."""

    future: Future[dict[str, Any]]
    started: float
    moved: float  # when it last reported progress (monotonic)
    last: dict[str, Any] | None = field(default=None)  # its last progress report


class Preparation:
    """Starts preparations while slots are free, collects them, and replaces the CPU pool when one is stuck."""

    def __init__(self, config: Config, ledger: Ledger, failures: Failures, stopping: threading.Event) -> None:
        self.cfg, self.ledger, self.failures, self.stopping = config, ledger, failures, stopping
        prep = config.preprocess
        self.settings = PrepSettings(mediapipe_dir=prep.mediapipe_dir, pose_model=prep.pose_model,
                                     max_area=prep.max_area)
        self.pool: CpuPool | None = None
        self.running: dict[str, Preparing] = {}

    def start(self) -> None:
        self.pool = CpuPool(self.cfg.preprocess.workers)

    def start_next(self) -> None:
        """Claim queued jobs for the free slots and hand them to the CPU pool."""
        while not self.stopping.is_set() and len(self.running) < self.cfg.preprocess.workers:
            record = self.ledger.claim_next(S.QUEUED, S.PREPROCESSING, message="preprocessing on the CPU")
            if record is None:
                return
            kill_point("state.preprocessing")
            if not self._inputs_in_work(record):
                continue
            assert self.pool is not None
            future = self.pool.submit(prepare_job, record.job, record.work_dir, self.settings)
            now = time.monotonic()
            self.running[record.id] = Preparing(future, now, now)
            self.ledger.record_progress(record.id, "preprocess", None, None)
            jlog(logging.INFO, record.id, "preprocessing")

    def _inputs_in_work(self, record: JobRecord) -> bool:
        """A retried job's inputs may sit in failed/<name>/: bring them back; fail if they are gone."""
        self.failures.bring_back_inputs(record.id)
        missing = [role for role, item in record.job.inputs.items() if not item.path.is_file()]
        if missing:
            taken = jobfiles.work_inputs_dir(self.cfg.paths.work, record.id)
            why = f"its input files are gone from {taken} ({', '.join(missing)}): submit it again"
            self.failures.give_up(record.id, S.PREPROCESSING, why, ErrorKind.INPUT)
            return False
        return True

    def collect(self) -> None:
        """Record finished preparations (ready, or the failure), poll the others' progress, replace a stuck pool."""
        stuck = []
        for job_id, running in list(self.running.items()):
            if not running.future.done():
                self.poll_progress(job_id)
                stall = self.cfg.preprocess.stall_seconds
                if stall > 0 and time.monotonic() - running.moved > stall:
                    stuck.append(job_id)
                continue
            del self.running[job_id]
            self._finished(job_id, running)
        if stuck:
            self._restart(stuck)

    def _finished(self, job_id: str, running: Preparing) -> None:
        seconds = time.monotonic() - running.started
        try:
            running.future.result()
        except PreprocessFailed as exc:
            self.failures.fail(job_id, S.PREPROCESSING, str(exc), exc.kind, exc.retryable)
            return
        except Exception as exc:  # the pool process died (killed, out of memory)
            self.failures.fail(job_id, S.PREPROCESSING, f"preprocessing process died: {exc!r}", ErrorKind.INTERNAL,
                               True)
            return
        self.ledger.record_timing(job_id, "preprocess", seconds)
        if self.ledger.transition(job_id, S.PREPROCESSING, S.READY, f"prepared in {seconds:.1f} s"):
            kill_point("state.ready")
            jlog(logging.INFO, job_id, "ready for the GPU pool (prepared in %.1f s)", seconds)
        elif not self.ledger.holds(job_id):
            jlog(logging.WARNING, job_id, "prepared, but not here any more: lease lost (another host took it over)")
        else:
            jlog(logging.INFO, job_id, "prepared, but it was cancelled meanwhile")

    def _restart(self, stuck: list[str]) -> None:
        """Preparations with no progress for stall_seconds: which pool process runs which job cannot be told,
        so the whole CPU pool is replaced; the stuck jobs fail this attempt (retried with backoff), the others
        go back in line untouched."""
        stall = self.cfg.preprocess.stall_seconds
        for job_id, running in list(self.running.items()):
            del self.running[job_id]
            if job_id not in stuck:
                self.ledger.transition(job_id, S.PREPROCESSING, S.QUEUED, "requeued: the CPU pool was restarted")
                continue
            last = running.last
            where = f" (last progress: {last['phase']} {last['step']}/{last['total']})" if last else ""
            self.failures.fail(job_id, S.PREPROCESSING, f"preprocessing made no progress for {stall:g} s{where}; "
                               "its process was killed ([preprocess] stall_seconds)", ErrorKind.INTERNAL, True)
        log.error("preprocessing: %d stuck preparation(s); restarting the CPU pool", len(stuck))
        assert self.pool is not None
        self.pool.kill()
        self.pool = CpuPool(self.cfg.preprocess.workers)

    def poll_progress(self, job_id: str) -> None:
        """A preparation's latest progress file into the ledger (and its stall clock reset) when it moved."""
        running = self.running[job_id]
        progress = read_progress(self.cfg.paths.work / job_id)
        if progress and progress != running.last:
            running.last, running.moved = progress, time.monotonic()
            self.ledger.record_progress(job_id, f"preprocess:{progress['phase']}", progress["step"],
                                        progress["total"])

    def stop(self) -> None:
        """Let running preparations finish for a while, put the rest back in line, kill the CPU pool."""
        if self.pool is None:
            return
        deadline = time.monotonic() + min(30.0, self.cfg.pool.stop_grace_seconds)
        while self.running and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.1)
        for job_id in list(self.running):
            del self.running[job_id]
            self.ledger.transition(job_id, S.PREPROCESSING, S.QUEUED, "requeued: the daemon is stopping")
        self.pool.kill()
        self.pool = None
