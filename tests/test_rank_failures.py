"""The failure watch over a real TCPStore: a posted failure is reported once after the grace period, and only
while the job's outcome is not yet gathered. Ending the process is replaced by a recorder here (the real pool
test in test_serve_real_pool.py lets it end a real rank)."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from daemon import protocol
from pipeline.rank_failures import FailureWatch

FAILURE = protocol.Error(job="j1", kind="oom", message="out of memory: 2 GiB", retryable=False)


@pytest.fixture
def store_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    yield port
    del server


def watch_pair(port: int, grace: float) -> tuple[FailureWatch, FailureWatch, list, list]:
    connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))  # noqa: E731
    reports: list = []
    ended: list = []
    rank0 = FailureWatch(0, 2, grace, report=reports.append, end_pool=lambda: ended.append(True), connect=connect,
                         poll_s=0.02)  # fmt: skip
    rank1 = FailureWatch(1, 2, grace, report=lambda m: None, connect=connect)
    return rank0, rank1, reports, ended


def test_a_failure_nobody_gathers_is_reported_once_after_the_grace_period(store_port: int) -> None:
    rank0, rank1, reports, ended = watch_pair(store_port, grace=0.3)
    with rank0.watching(seq=4):
        rank1.post(4, FAILURE)
        start = time.monotonic()
        while not ended and time.monotonic() - start < 5:
            time.sleep(0.02)
        waited = time.monotonic() - start
    assert ended == [True] and len(reports) == 1 and waited >= 0.3
    (message,) = reports
    assert message.job == "j1" and message.kind == "oom" and message.retryable is False
    assert message.message.startswith("rank 1: out of memory: 2 GiB") and "the pool restarts" in message.message


def test_a_failure_gathered_within_the_grace_period_is_left_to_the_normal_path(store_port: int) -> None:
    rank0, rank1, reports, ended = watch_pair(store_port, grace=0.5)
    with rank0.watching(seq=0):
        rank1.post(0, FAILURE)
        time.sleep(0.1)  # the closing gather completes well within the grace period
    time.sleep(0.7)
    assert reports == [] and ended == []


def test_failures_belong_to_their_job_number(store_port: int) -> None:
    rank0, rank1, reports, ended = watch_pair(store_port, grace=0.05)
    rank1.post(1, FAILURE)  # an earlier job of the pool (a retried job keeps its id, not its number)
    with rank0.watching(seq=2):
        time.sleep(0.5)
    assert reports == [] and ended == []


def test_a_pool_of_one_process_needs_no_store() -> None:
    def no_store() -> dist.Store:
        raise AssertionError("a single process must not touch the store")

    alone = FailureWatch(0, 1, 0.0, report=lambda m: None, connect=no_store)
    alone.post(0, FAILURE)
    with alone.watching(seq=0):
        pass
