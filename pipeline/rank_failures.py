"""A failure on one rank reaches the supervisor within seconds, even while the other ranks wait in a collective.

Why: a rank that raises mid-job (CUDA out of memory on one GPU, a bug on one rank) leaves the others blocked in
the collective they were in until its timeout (600 s). The pool looks hung, the supervisor kills it at its
heartbeat deadline, and the reason is lost. So a failing rank first posts its error to the process group's
key-value store (the TCPStore torchrun serves; no collective needed), and rank 0 watches the store from a
thread while a job runs. A failure still posted after a grace period, with rank 0 not yet past the job's
closing gather, means some rank is stuck: rank 0 reports that failure itself and ends the pool, which the
supervisor relaunches (a communicator left in the middle of a collective is not reusable anyway).
Failures that every rank reaches together go the normal way, through the gather, within the grace period.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import torch.distributed as dist

from daemon import protocol

ErrorMessage = protocol.Error


def _key(seq: int, rank: int) -> str:
    return f"wanbox/failure/{seq}/{rank}"  # seq: the pool's job counter (a retried job id comes back)


def connect_store(timeout_s: float = 30.0) -> dist.Store:
    """A client of the store the process group rendezvoused on (MASTER_ADDR/MASTER_PORT, set by torchrun)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)  # fmt: skip


class FailureWatch:
    """post() on any rank; on rank 0, watching(seq) around a job and settle() once its outcome is gathered."""

    def __init__(self, rank: int, world_size: int, grace_s: float, report: Callable[[ErrorMessage], None],
                 end_pool: Callable[[], None] | None = None, connect: Callable[[], dist.Store] = connect_store,
                 poll_s: float = 0.5) -> None:  # fmt: skip
        self.rank, self.world_size, self.grace_s, self.poll_s = rank, world_size, grace_s, poll_s
        self.report, self.end_pool, self.connect = report, end_pool or _end_process, connect
        self._lock = threading.Lock()
        self._settled = True

    def post(self, seq: int, failure: ErrorMessage) -> None:
        """Publish this rank's failure of job number `seq` (best effort: the normal path still runs)."""
        if self.world_size == 1:
            return  # no other rank can be stuck waiting for this one
        named = replace(failure, message=f"rank {self.rank}: {failure.message}")
        try:
            self.connect().set(_key(seq, self.rank), protocol.encode(named))
        except Exception as exc:  # a lost store must not turn a reported failure into a crash
            print(f"worker: could not post the failure to the store: {exc}", file=sys.stderr)

    @contextmanager
    def watching(self, seq: int) -> Iterator[None]:
        """Rank 0: watch the store during the job; other ranks and pools of one process do nothing."""
        if self.rank != 0 or self.world_size == 1:
            yield
            return
        with self._lock:
            self._settled = False
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(seq, stop), name="failure-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.settle()
            stop.set()
            thread.join(timeout=5)

    def settle(self) -> None:
        """The job's outcome was gathered: from now on the normal path reports it. Blocks while the watch is
        reporting (which ends the process), so that one failure is never reported twice."""
        with self._lock:
            self._settled = True

    def _watch(self, seq: int, stop: threading.Event) -> None:
        try:
            store = self.connect()
        except Exception as exc:
            print(f"worker: failure watch disabled, no store: {exc}", file=sys.stderr)
            return
        first_seen: float | None = None
        while not stop.wait(self.poll_s):
            failure = self._first_posted(store, seq)
            if failure is None:
                continue
            first_seen = first_seen if first_seen is not None else time.monotonic()
            if time.monotonic() - first_seen < self.grace_s:
                continue
            with self._lock:  # held to the end: settle() waits, and the process ends here
                if self._settled:
                    return
                note = " (the other ranks were left waiting in a collective; the pool restarts)"
                self.report(replace(failure, message=failure.message + note))
                self.end_pool()
                return

    def _first_posted(self, store: dist.Store, seq: int) -> ErrorMessage | None:
        for rank in range(self.world_size):
            key = _key(seq, rank)
            try:
                if store.check([key]):
                    message = protocol.to_message(protocol.decode(store.get(key)))
                    return message if isinstance(message, protocol.Error) else None
            except Exception:  # the store went away: the pool is ending anyway
                return None
        return None


def _end_process() -> None:
    """End this rank now; torchrun then stops the others, which may be blocked in a collective forever."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
