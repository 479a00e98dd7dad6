"""Failures, retries and crashes on a real ledger, SQLite and PostgreSQL: attempts and backoff, recovery of
jobs left running at start-up, and a writer SIGKILLed in the middle of a transaction leaving a consistent
database (on SQLite also a sound file).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from daemon.ledger import Backoff, JobRecord, Ledger
from daemon.states import RUNNING, JobState, shortest_path

S = JobState
REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger.open(ledger_url, backoff=Backoff(base_s=10, cap_s=25)) as opened:
        yield opened


def add(ledger: Ledger, state: JobState, name: str = "cat", max_attempts: int = 3) -> str:
    job = ledger.add_staged(name, "i2v", f"inbox/{name}.toml", None, max_attempts=max_attempts, now=T0)
    current = S.STAGED
    for nxt in shortest_path(S.STAGED, state):
        assert ledger.transition(job.id, current, nxt, f"to {nxt}", now=T0)
        current = nxt
    return job.id


# ---- backoff and attempts -------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base_s=30, cap_s=3600)
    assert [backoff.delay(n).total_seconds() for n in (1, 2, 3, 4, 7, 8, 500)] == [
        30, 60, 120, 240, 1920, 3600, 3600,
    ]  # fmt: skip
    assert backoff.delay(0).total_seconds() == 30


def test_retryable_failures_go_back_with_growing_delays_then_fail_for_good(ledger: Ledger) -> None:
    job_id = add(ledger, S.SAMPLING, max_attempts=4)
    now = T0
    for attempt, delay in [(1, 10), (2, 20), (3, 25)]:
        assert (
            ledger.record_failure(job_id, S.SAMPLING, "CUDA out of memory", "oom", True, now=now) == S.READY
        )
        job = ledger.get(job_id)
        assert (job.state, job.attempts, job.error_kind, job.last_error) == (
            S.READY,
            attempt,
            "oom",
            "CUDA out of memory",
        )
        assert job.retry_after == now + timedelta(seconds=delay)
        assert ledger.events(job_id)[-1].message == (
            f"attempt {attempt} of 4 failed (oom): CUDA out of memory; retrying in {delay} s"
        )
        assert ledger.claim_next(S.READY, S.SAMPLING, now=job.retry_after - timedelta(seconds=1)) is None
        assert ledger.claim_next(S.READY, S.SAMPLING, now=job.retry_after).id == job_id
        now = job.retry_after
    assert ledger.record_failure(job_id, S.SAMPLING, "CUDA out of memory", "oom", True, now=now) == S.FAILED
    job = ledger.get(job_id)
    assert (job.state, job.attempts) == (S.FAILED, 4)
    assert ledger.events(job_id)[-1].message == (
        "gave up after 4 of 4 attempts; the last failed (oom): CUDA out of memory"
    )
    assert ledger.audit() == []


def test_each_running_state_retries_to_the_step_that_lost_its_output(ledger: Ledger) -> None:
    expected = {S.PREPROCESSING: S.QUEUED, S.SAMPLING: S.READY, S.FINALIZING: S.READY}
    for state, back in expected.items():
        job_id = add(ledger, state, name=state.value)
        assert ledger.record_failure(job_id, state, "flaky", "internal", True, now=T0) == back
        assert ledger.get(job_id).state == back


def test_a_permanent_error_fails_at_once(ledger: Ledger) -> None:
    job_id = add(ledger, S.PREPROCESSING)
    result = ledger.record_failure(
        job_id, S.PREPROCESSING, "no person found in frame 0", "input", False, now=T0
    )
    assert result == S.FAILED
    job = ledger.get(job_id)
    assert (job.attempts, job.retry_after, job.error_kind) == (1, None, "input")
    assert ledger.events(job_id)[-1].message == (
        "failed (input, not retryable) on attempt 1: no person found in frame 0"
    )


def test_a_failure_outside_a_running_state_is_final(ledger: Ledger) -> None:
    job_id = add(ledger, S.QUEUED)
    assert ledger.record_failure(job_id, S.QUEUED, "work dir vanished", "internal", True) == S.FAILED


def test_a_failure_report_for_a_job_that_moved_on_changes_nothing(ledger: Ledger) -> None:
    job_id = add(ledger, S.SAMPLING)
    ledger.cancel(job_id, "stop it")
    events = len(ledger.events(job_id))
    assert ledger.record_failure(job_id, S.SAMPLING, "cancelled at step 3", "cancelled", False) is None
    job = ledger.get(job_id)
    assert (job.state, job.attempts, job.last_error) == (S.CANCELLED, 0, None)
    assert len(ledger.events(job_id)) == events


# ---- recovery at start-up ----------------------------------------------------------------------------


def test_recovery_puts_each_running_state_back_in_line_and_counts_the_attempt(ledger: Ledger) -> None:
    jobs = {state: add(ledger, state, name=state.value) for state in JobState}
    later = T0 + timedelta(minutes=5)

    moved = ledger.recover_interrupted(later)

    assert sorted(moved) == sorted([
        (jobs[S.PREPROCESSING], S.PREPROCESSING, S.QUEUED),
        (jobs[S.SAMPLING], S.SAMPLING, S.READY),
        (jobs[S.FINALIZING], S.FINALIZING, S.READY),
    ])  # fmt: skip
    for state, job_id in jobs.items():
        job = ledger.get(job_id)
        if state in RUNNING:
            assert (job.attempts, job.error_kind, job.retry_after) == (1, "interrupted", None)  # due at once
            message = ledger.events(job_id)[-1].message
            assert message.startswith(f"recovered at start-up: interrupted in {state.value}")
            assert message.endswith("attempt 1 of 3")
        else:
            assert (job.state, job.attempts) == (state, 0)
    assert ledger.recover_interrupted(later) == []  # nothing is left running
    assert ledger.audit() == []


def test_recovery_asks_whether_prepared_inputs_survived(ledger: Ledger) -> None:
    lost = add(ledger, S.SAMPLING, name="lost")
    kept = add(ledger, S.FINALIZING, name="kept")
    preparing = add(ledger, S.PREPROCESSING, name="preparing")
    asked: list[str] = []

    def has_prepared_inputs(job: JobRecord) -> bool:
        asked.append(job.id)
        return job.id == kept

    moved = ledger.recover_interrupted(T0, has_prepared_inputs=has_prepared_inputs)
    assert sorted(asked) == sorted([lost, kept])  # preprocessing jobs are prepared again anyway
    assert {job_id: to for job_id, _, to in moved} == {lost: S.QUEUED, kept: S.READY, preparing: S.QUEUED}
    assert ledger.events(lost)[-1].message.endswith("its prepared inputs are gone, so it is prepared again")


def test_a_raising_check_does_not_stop_the_recovery_of_the_others(ledger: Ledger) -> None:
    first = add(ledger, S.SAMPLING, name="first")
    second = add(ledger, S.FINALIZING, name="second")

    def broken(job: JobRecord) -> bool:
        if job.id == first:
            raise PermissionError(f"work/{job.id}: permission denied")
        return True

    moved = ledger.recover_interrupted(T0, has_prepared_inputs=broken)
    assert {job_id: to for job_id, _, to in moved} == {first: S.QUEUED, second: S.READY}


def test_a_job_that_keeps_killing_the_pool_is_failed_instead_of_looping(ledger: Ledger) -> None:
    job_id = add(ledger, S.SAMPLING, max_attempts=3)
    now = T0
    for start_up in range(1, 4):
        moved = ledger.recover_interrupted(now)
        now += timedelta(hours=1)
        if start_up < 3:
            assert moved == [(job_id, S.SAMPLING, S.READY)]
            assert ledger.claim_next(S.READY, S.SAMPLING, now=now).id == job_id
    assert moved == [(job_id, S.SAMPLING, S.FAILED)]
    job = ledger.get(job_id)
    assert (job.state, job.attempts, job.error_kind) == (S.FAILED, 3, "interrupted")
    assert "died while running this job (3 attempts, the last one interrupted in sampling)" in job.last_error
    assert f"`wanbox retry {job_id}`" in job.last_error
    assert ledger.events(job_id)[-1].message == f"gave up: {job.last_error}"
    assert ledger.recover_interrupted(now) == []
    assert ledger.audit() == []


# ---- a writer killed mid-transaction ------------------------------------------------------------------

HOLD_IN_COMMIT = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import event
    from daemon.ledger import Ledger
    from daemon.states import JobState as S
    ledger = Ledger.open(sys.argv[1])
    def hold(conn):  # runs after the UPDATE and the event INSERT, just before COMMIT
        print("holding", flush=True)
        time.sleep(120)
    event.listen(ledger.engine, "commit", hold)
    ledger.transition(sys.argv[2], S.READY, S.SAMPLING, "never committed", phase="load")
    """
)

CHURN = textwrap.dedent(
    """
    import sys
    from daemon.ledger import Backoff, Ledger
    from daemon.states import JobState as S
    ledger = Ledger.open(sys.argv[1], backoff=Backoff(base_s=0, cap_s=0))
    for n in range(100000):
        job = ledger.claim_next(S.QUEUED, S.PREPROCESSING)
        ledger.record_progress(job.id, "prepare", n, 100000)
        ledger.record_timing(job.id, "prepare", 0.5)
        ledger.record_failure(job.id, S.PREPROCESSING, "flaky", "internal", True)
        if n == 3:
            print("churning", flush=True)
    """
)


def start(script: str, *args: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    line = child.stdout.readline()  # blocks until the child reached its point (or died)
    assert line.strip() in ("holding", "churning"), child.stderr.read()
    return child


def kill(child: subprocess.Popen[str]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stdout.close()
    child.stderr.close()


def assert_file_is_sound(url: str) -> None:
    """SQLite: the file passes its integrity checks (PostgreSQL's own recovery is not ours to check)."""
    if not url.startswith("sqlite"):
        return
    with sqlite3.connect(make_url(url).database) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []


def test_sigkill_in_the_middle_of_a_transition_leaves_no_trace(ledger_url: str, backend: str) -> None:
    path = ledger_url
    held = {"sqlite": "locked", "postgresql": "lock timeout"}[backend]  # a write lock / the job's row lock
    with Ledger.open(path) as ledger:
        job_id = add(ledger, S.READY)
        events = [(e.id, e.to_state) for e in ledger.events(job_id)]
    child = start(HOLD_IN_COMMIT, path, job_id)
    try:
        with (
            Ledger.open(path, busy_timeout_s=0.2) as impatient,
            pytest.raises(OperationalError, match=held),
        ):
            impatient.cancel(job_id)  # proves the child really holds the write transaction open
    finally:
        kill(child)

    assert_file_is_sound(path)
    with Ledger.open(path) as reopened:
        job = reopened.get(job_id)
        assert (job.state, job.phase) == (S.READY, None)
        assert [(e.id, e.to_state) for e in reopened.events(job_id)] == events
        assert reopened.audit() == []
        assert reopened.transition(job_id, S.READY, S.SAMPLING, "the lock died with the process")


def test_sigkill_during_a_stream_of_writes_leaves_a_consistent_ledger(ledger_url: str) -> None:
    path = ledger_url
    with Ledger.open(path) as ledger:
        ids = {add(ledger, S.QUEUED, name=f"job{i}", max_attempts=10**6) for i in range(5)}
    child = start(CHURN, path)
    time.sleep(0.3)
    kill(child)

    assert_file_is_sound(path)
    with Ledger.open(path) as reopened:
        assert reopened.audit() == []
        recovered = reopened.recover_interrupted()
        assert len(recovered) <= 1  # at most the one job the child was holding
        assert reopened.audit() == []
        jobs = reopened.list()
        assert {j.id for j in jobs} == ids
        assert {j.state for j in jobs} == {S.QUEUED}
        churned = sum(len(reopened.events(j.id)) for j in jobs) - 5 * 2
        assert churned >= 8, "the child made progress before it was killed"
