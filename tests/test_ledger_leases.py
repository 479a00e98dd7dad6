"""Leases and fencing in the ledger, on SQLite and PostgreSQL: two hosts (two Ledgers with their own host ids) on
one database. A claim takes a lease, the heartbeat renews it, the sweep takes an expired one back counting the
attempt, and every write of a host that lost its job is refused in the same transaction. Also the ingest claim.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from daemon.ledger import JobRecord, LeaseLost, Ledger
from daemon.ledger.intents import FAIL, FINALIZE, Intents
from daemon.states import ErrorKind, JobState

S = JobState
SHORT = 0.4  # seconds: a lease that runs out while the test waits a little


@pytest.fixture
def hosts(ledger_url: str) -> Iterator[tuple[Ledger, Ledger]]:
    """Host a (short leases) and host b on one database, as two supervisors would open it."""
    with Ledger.open(ledger_url) as a, Ledger.open(ledger_url) as b:
        yield a.hold_as("host-a", SHORT), b.hold_as("host-b", 30)


def ready_job(ledger: Ledger, name: str = "cat") -> str:
    job = ledger.add_staged(name, "i2v", f"inbox/{name}.toml", None, model_id="i2v-A14B")
    assert job is not None
    for frm, to in ((S.STAGED, S.QUEUED), (S.QUEUED, S.PREPROCESSING), (S.PREPROCESSING, S.READY)):
        ledger.transition(job.id, frm, to, f"to {to}")
    return job.id


def claim(ledger: Ledger) -> JobRecord:
    record = ledger.claim_next(S.READY, S.SAMPLING)
    assert record is not None
    return record


def expire(ledger: Ledger, job_id: str) -> None:
    """Wait (on the database's clock) until the job's lease has run out."""
    holder, until, _ = ledger.lease_info(job_id)
    assert holder is not None and until is not None
    while ledger.lease_info(job_id)[2] <= until:
        time.sleep(0.05)


def test_a_claim_takes_a_lease_on_the_database_clock_and_names_its_host(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    job_id = ready_job(b)
    record = claim(a)
    holder, until, now = a.lease_info(job_id)
    assert (record.id, holder) == (job_id, "host-a")
    assert until is not None and timedelta(0) < until - now <= timedelta(seconds=SHORT)
    assert a.events(job_id)[-1].host == "host-a"  # the attempt records the host that ran it
    assert b.take_expired() == []  # not expired yet: b leaves it alone
    # Waiting and queued jobs have no holder: it is given back with the move out of the running states.
    assert a.transition(job_id, S.SAMPLING, S.READY, "requeued")
    assert a.lease_info(job_id)[:2] == (None, None)


def test_the_heartbeat_renews_only_this_hosts_leases(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    mine, theirs = ready_job(a, "one"), ready_job(a, "two")
    assert claim(a).id == mine and claim(b).id == theirs
    before = a.lease_info(theirs)[1]
    time.sleep(SHORT / 2)
    assert a.renew_leases() == 1
    assert a.lease_info(theirs)[1] == before  # b's lease is b's to renew
    for _ in range(3):  # renewed more often than it lasts: never swept
        time.sleep(SHORT / 2)
        a.renew_leases()
        assert b.take_expired() == []


def test_an_expired_lease_is_taken_back_counting_the_attempt_and_naming_the_host(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    job_id = ready_job(a)
    claim(a)
    expire(a, job_id)
    assert a.take_expired() == []  # a host never sweeps its own jobs (it still runs them)
    assert b.take_expired() == [(job_id, S.SAMPLING, S.READY)]
    record = b.get(job_id)
    assert (record.state, record.attempts, record.holder, record.lease_until) == (S.READY, 1, None, None)
    assert record.error_kind == ErrorKind.INTERRUPTED and record.attempts_made == 1
    last = b.events(job_id)[-1]
    assert "taken back from host host-a by host-b" in last.message and last.host == "host-b"
    assert claim(b).holder == "host-b"  # and another host runs it


def test_a_host_that_lost_its_lease_can_write_nothing_for_the_job(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    job_id = ready_job(a)
    claim(a)
    assert a.holds(job_id)
    expire(a, job_id)
    b.take_expired()
    claim(b)  # b runs it now
    # Every write a (frozen until now) makes for the job is refused, each in its own transaction.
    assert not a.holds(job_id)
    assert not a.transition(job_id, S.SAMPLING, S.FINALIZING, "the worker reported done")
    assert not a.record_progress(job_id, "sampling", 3, 10)
    assert a.record_failure(job_id, S.SAMPLING, "oom", ErrorKind.OOM, True) is None
    with pytest.raises(LeaseLost):
        a.record_timing(job_id, "sampling", 1.0)
    with pytest.raises(LeaseLost, match="host-a no longer holds"):
        Intents(a).replace(job_id, FINALIZE, {"base": "cat"})
    with pytest.raises(LeaseLost):
        Intents(a).record(job_id, FAIL, {"failed_dir": "x"})
    record = b.get(job_id)
    assert (record.state, record.holder, record.step, record.timings_json) == (S.SAMPLING, "host-b", None, None)
    assert Intents(b).get(job_id) is None
    # b's own writes go through (and renew its lease); the done transition is b's.
    assert b.transition(job_id, S.SAMPLING, S.FINALIZING, "done") and b.holds(job_id)
    assert b.transition(job_id, S.FINALIZING, S.DONE, "delivered")
    assert not a.holds(job_id) and b.get(job_id).holder == "host-b"  # an ended job keeps its last holder


def test_a_lease_that_ran_out_but_was_not_taken_is_still_its_holders(hosts: tuple[Ledger, Ledger]) -> None:
    a, _ = hosts
    job_id = ready_job(a)
    claim(a)
    expire(a, job_id)
    # Nobody swept it: a (whose loop was slow) still owns it, and its write renews the lease.
    assert a.transition(job_id, S.SAMPLING, S.FINALIZING, "done")
    holder, until, now = a.lease_info(job_id)
    assert holder == "host-a" and until is not None and until > now


def test_start_up_recovery_touches_only_this_hosts_jobs(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    mine, theirs = ready_job(a, "one"), ready_job(a, "two")
    claim(a), claim(b)
    assert a.recover_interrupted() == [(mine, S.SAMPLING, S.READY)]
    assert b.get(theirs).state == S.SAMPLING and b.get(theirs).holder == "host-b"


def test_jobs_held_but_not_run_any_more_go_back_in_line(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    running, lost = ready_job(a, "one"), ready_job(a, "two")
    claim(a), claim(a)
    assert a.release_orphans({running}) == [(lost, S.SAMPLING, S.READY)]
    assert b.get(lost).holder is None and b.get(running).holder == "host-a"


def test_intents_are_redone_and_cleared_by_their_own_host_only(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    job_id = ready_job(a)
    claim(a)
    a.transition(job_id, S.SAMPLING, S.FINALIZING, "done")
    Intents(a).replace(job_id, FINALIZE, {"base": "cat"})
    assert [i.job_id for i in Intents(a).pending()] == [job_id]
    assert Intents(b).pending() == []
    Intents(b).clear(job_id)  # not b's: nothing happens
    assert Intents(a).get(job_id) is not None and Intents(a).get(job_id).host_id == "host-a"


def test_exactly_one_host_wins_an_upload(hosts: tuple[Ledger, Ledger]) -> None:
    a, b = hosts
    key = "cat.toml|1234|99|1700000000000000000"
    won = a.add_staged("cat", "unknown", "inbox/cat.toml", None, claim=key)
    assert won is not None
    assert b.add_staged("cat", "unknown", "inbox/cat.toml", None, claim=key) is None
    assert [j.id for j in b.list(limit=None)] == [won.id]  # the loser wrote nothing
    assert b.claimed_by(key) == "host-a" and b.claim_holder(won.id) == "host-a"
    again = b.add_staged("cat", "unknown", "inbox/cat.toml", None, claim="cat.toml|1235|99|1700000000000000001")
    assert again is not None and a.claim_holder(again.id) == "host-b"  # a new upload under that name is new


def test_without_a_host_nothing_is_fenced(ledger_url: str) -> None:
    """The CLI's ledger (no host id) takes no leases and is never refused: `wanbox cancel` of a running job."""
    with Ledger.open(ledger_url) as host, Ledger.open(ledger_url) as cli:
        host.hold_as("host-a", 30)
        job_id = ready_job(cli)
        claim(host)
        assert cli.holds(job_id) and cli.cancel(job_id) == S.SAMPLING
        assert cli.get(job_id).lease_until is None

