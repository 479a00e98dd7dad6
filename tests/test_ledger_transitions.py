"""The transition table on a real ledger: every legal move works and logs one event, every other move is
refused without writing anything, and ledgers racing for one move or one job produce one winner.

Each database test runs on SQLite and on PostgreSQL (conftest's `backend`), each on a new database.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from daemon.ledger import IllegalTransition, JobNotFound, Ledger, utcnow
from daemon.states import ALLOWED, EDGES, RETRY_STATE, RUNNING, TERMINAL, JobState, shortest_path

S = JobState
LEGAL = sorted(EDGES, key=lambda e: (e[0].value, e[1].value))
ILLEGAL = [(a, b) for a, b in itertools.product(JobState, JobState) if (a, b) not in EDGES]


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger.open(ledger_url) as opened:
        yield opened


def log(ledger: Ledger, job_id: str) -> list[tuple[int, JobState | None, JobState, str]]:
    return [(e.id, e.from_state, e.to_state, e.message) for e in ledger.events(job_id)]


def job_in(ledger: Ledger, state: JobState) -> str:
    """A new job driven to `state` along legal moves."""
    job = ledger.add_staged("cat", "i2v", "inbox/cat.toml", None)
    current = S.STAGED
    for nxt in shortest_path(S.STAGED, state):
        assert ledger.transition(job.id, current, nxt, f"to {nxt}")
        current = nxt
    return job.id


# ---- the table itself ---------------------------------------------------------------------------


def test_table_covers_the_documented_lifecycle() -> None:
    assert {s.value for s in JobState} == {
        "staged", "queued", "preprocessing", "ready", "sampling", "finalizing",
        "done", "failed", "rejected", "cancelled",
    }  # fmt: skip
    assert {S.PREPROCESSING, S.SAMPLING, S.FINALIZING} == RUNNING
    assert {S.DONE, S.FAILED, S.REJECTED, S.CANCELLED} == TERMINAL
    assert ALLOWED[S.DONE] == frozenset() and ALLOWED[S.REJECTED] == frozenset()
    assert ALLOWED[S.FAILED] == {S.QUEUED} and ALLOWED[S.CANCELLED] == {S.QUEUED}
    for state in set(JobState) - TERMINAL:
        assert S.CANCELLED in ALLOWED[state], f"{state} cannot be cancelled"
    for running, back in RETRY_STATE.items():
        assert back in ALLOWED[running]
    assert all(reason.strip() for reason in EDGES.values())


def test_every_state_is_reachable_and_every_job_can_end() -> None:
    for state in JobState:
        if state != S.STAGED:
            assert shortest_path(S.STAGED, state)[-1] == state
        if state not in TERMINAL:
            assert shortest_path(state, S.DONE)[-1] == S.DONE
    with pytest.raises(ValueError, match="no legal path from done to queued"):
        shortest_path(S.DONE, S.QUEUED)


def test_states_read_as_plain_words() -> None:
    assert str(S.SAMPLING) == "sampling" and f"{S.QUEUED}" == "queued"
    assert S("ready") is S.READY and S.READY == "ready"


# ---- on the database ----------------------------------------------------------------------------


@pytest.mark.parametrize(("frm", "to"), LEGAL, ids=[f"{a.value}->{b.value}" for a, b in LEGAL])
def test_every_legal_move_succeeds_and_writes_exactly_one_event(
    ledger: Ledger, frm: JobState, to: JobState
) -> None:
    job_id = job_in(ledger, frm)
    before = ledger.events(job_id)
    now = utcnow()

    assert ledger.transition(job_id, frm, to, f"test {frm}->{to}", now=now)

    after = ledger.events(job_id)
    assert len(after) == len(before) + 1
    last = after[-1]
    assert (last.from_state, last.to_state, last.message) == (frm, to, f"test {frm}->{to}")
    assert last.at == now
    job = ledger.get(job_id)
    assert job.state == to and job.updated_at == now
    assert ledger.audit() == []


@pytest.mark.parametrize("frm", list(JobState), ids=[s.value for s in JobState])
def test_every_illegal_move_raises_and_writes_nothing(ledger: Ledger, frm: JobState) -> None:
    job_id = job_in(ledger, frm)
    events = log(ledger, job_id)
    illegal = [to for a, to in ILLEGAL if a == frm]
    assert illegal, "every state has at least one illegal move (itself)"
    for to in illegal:
        with pytest.raises(IllegalTransition, match=f"{frm.value} -> {to.value} is not a legal move"):
            ledger.transition(job_id, frm, to, "must not be written")
    assert ledger.get(job_id).state == frm
    assert log(ledger, job_id) == events


def test_illegal_move_message_lists_the_legal_ones(ledger: Ledger) -> None:
    job_id = job_in(ledger, S.READY)
    with pytest.raises(IllegalTransition) as caught:
        ledger.transition(job_id, S.READY, S.DONE, "skip the work")
    assert "cancelled, failed, queued, sampling" in str(caught.value)
    assert caught.value.job_id == job_id


def test_move_from_the_wrong_state_returns_false_and_logs_nothing(ledger: Ledger) -> None:
    job_id = job_in(ledger, S.QUEUED)
    events = log(ledger, job_id)
    assert not ledger.transition(job_id, S.READY, S.SAMPLING, "it is not ready")
    assert ledger.get(job_id).state == S.QUEUED
    assert log(ledger, job_id) == events


def test_move_of_an_unknown_job_raises_not_found(ledger: Ledger) -> None:
    with pytest.raises(JobNotFound, match="no job with id '20990101-000000-zzzz'"):
        ledger.transition("20990101-000000-zzzz", S.QUEUED, S.PREPROCESSING, "ghost")


def test_fields_set_with_a_move_are_stored_in_the_same_commit(ledger: Ledger) -> None:
    job_id = job_in(ledger, S.STAGED)
    assert ledger.transition(
        job_id, S.STAGED, S.QUEUED, "accepted",
        work_dir="work/x", input_hash="abc123", params_json={"prompt": "a cat", "frames": 81},
    )  # fmt: skip
    job = ledger.get(job_id)
    assert (job.work_dir, job.input_hash, job.params_json) == (
        "work/x",
        "abc123",
        {"prompt": "a cat", "frames": 81},
    )


def test_fields_the_ledger_owns_cannot_be_set(ledger: Ledger) -> None:
    job_id = job_in(ledger, S.STAGED)
    for field in ("state", "id", "created_at", "no_such_column"):
        with pytest.raises(ValueError, match=f"cannot set job field\\(s\\) {field}"):
            ledger.transition(job_id, S.STAGED, S.QUEUED, "accepted", **{field: "x"})
    assert ledger.get(job_id).state == S.STAGED


def test_two_ledgers_racing_for_one_move_have_exactly_one_winner(ledger_url: str) -> None:
    url = ledger_url
    with Ledger.open(url) as first, Ledger.open(url) as second:
        job_id = job_in(first, S.READY)
        wins = [
            first.transition(job_id, S.READY, S.SAMPLING, "pool A took it"),
            second.transition(job_id, S.READY, S.SAMPLING, "pool B took it"),
        ]
        assert wins == [True, False]
        # the loser's cancel sees the winner's state, and the log shows one take only
        assert second.cancel(job_id, "stop") == S.SAMPLING
        moves = [(e.from_state, e.to_state, e.message) for e in first.events(job_id)][-2:]
        assert moves == [(S.READY, S.SAMPLING, "pool A took it"), (S.SAMPLING, S.CANCELLED, "stop")]


def test_concurrent_claimers_take_each_job_exactly_once(ledger_url: str) -> None:
    url = ledger_url
    with Ledger.open(url) as setup:
        ids = {job_in(setup, S.QUEUED) for _ in range(16)}
    ledgers = [Ledger.open(url) for _ in range(3)]  # separate engines: separate connections and locks
    taken: list[str] = []
    errors: list[BaseException] = []

    def claim_all(ledger: Ledger) -> None:
        try:
            while (job := ledger.claim_next(S.QUEUED, S.PREPROCESSING)) is not None:
                taken.append(job.id)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(ledger,)) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for ledger in ledgers:
        ledger.close()
    assert errors == []
    assert sorted(taken) == sorted(ids)
