"""Attempts charged to the right party (the ledger's rule, daemon/ledger/attempts.py), on both backends: a
supervisor death during a job is counted but not held against max_attempts, up to a limit that still stops a
job that keeps killing the supervisor; a failure of the job's own (a pool death) is charged; retry resets both.
Also the intents store the redo relies on.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from daemon.ledger import Ledger
from daemon.ledger.attempts import excused_limit
from daemon.ledger.intents import FAIL, FINALIZE, Intents
from daemon.states import ErrorKind, JobState
from tests.test_ledger_recovery import T0, add

S = JobState


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger.open(ledger_url) as opened:
        yield opened


def always(_job: object) -> bool:
    return True


def test_supervisor_deaths_are_not_the_jobs_fault_until_they_become_suspicious(ledger: Ledger) -> None:
    job_id = add(ledger, S.SAMPLING, max_attempts=2)
    limit = excused_limit(ledger.get(job_id))
    now = T0
    for death in range(1, limit):
        assert ledger.recover_interrupted(now, excuse=always) == [(job_id, S.SAMPLING, S.READY)]
        job = ledger.get(job_id)
        assert (job.attempts, job.excused_attempts, job.state) == (death, death, S.READY)
        assert "not the job's fault" in ledger.events(job_id)[-1].message
        assert ledger.claim_next(S.READY, S.SAMPLING, now=now).id == job_id
        now += timedelta(minutes=1)
    # Its own failure still counts in full: max_attempts 2 leaves one retry, then failed for good.
    assert ledger.record_failure(job_id, S.SAMPLING, "pool died", ErrorKind.POOL, True, now=now) == S.READY
    assert ledger.claim_next(S.READY, S.SAMPLING, now=now + timedelta(hours=2)).id == job_id
    assert ledger.recover_interrupted(now, excuse=always) == [(job_id, S.SAMPLING, S.FAILED)]  # the limit-th death
    job = ledger.get(job_id)
    assert job.excused_attempts == limit and f"died {limit} times while running this job" in job.last_error
    retried = ledger.retry(job_id)
    assert (retried.attempts, retried.excused_attempts) == (0, 0)
    assert ledger.audit() == []


def test_a_charged_failure_after_excused_interruptions_counts_only_itself(ledger: Ledger) -> None:
    job_id = add(ledger, S.SAMPLING, max_attempts=2)
    ledger.recover_interrupted(T0, excuse=always)
    ledger.claim_next(S.READY, S.SAMPLING, now=T0)
    assert ledger.record_failure(job_id, S.SAMPLING, "pool died", ErrorKind.POOL, True, now=T0) == S.READY
    ledger.claim_next(S.READY, S.SAMPLING, now=T0 + timedelta(hours=2))
    assert ledger.record_failure(job_id, S.SAMPLING, "pool died", ErrorKind.POOL, True, now=T0) == S.FAILED
    assert "gave up after 2 of 2 attempts" in ledger.events(job_id)[-1].message


def test_an_intent_keeps_the_first_plan_until_it_is_cleared(ledger: Ledger) -> None:
    job_id = add(ledger, S.FINALIZING)
    intents = Intents(ledger)
    assert intents.record(job_id, FINALIZE, {"base": "cat"}) == {"base": "cat"}
    assert intents.record(job_id, FINALIZE, {"base": "cat-2"}) == {"base": "cat"}  # the redo: the same name
    assert [i.job_id for i in intents.pending()] == [job_id]
    assert intents.record(job_id, FAIL, {"failed_dir": "x"}) == {"failed_dir": "x"}  # another step replaces it
    intents.clear(job_id, FINALIZE)
    assert intents.get(job_id).action == FAIL
    intents.clear(job_id)
    assert intents.get(job_id) is None and intents.pending() == []
