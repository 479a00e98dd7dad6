"""What the ledger refuses, as exceptions whose messages say what and what to do.

Only exception types: no database access, no files."""

from __future__ import annotations

from daemon.states import ALLOWED, JobState


class LedgerError(Exception):
    """Anything the ledger refuses; the message says what and what to do."""


class IllegalTransition(LedgerError):
    """A move that is not in states.ALLOWED: a bug in the caller, or a user asking the impossible."""

    def __init__(self, job_id: str, from_state: JobState, to_state: JobState, why: str = "") -> None:
        self.job_id, self.from_state, self.to_state = job_id, from_state, to_state
        legal = ", ".join(sorted(s.value for s in ALLOWED[from_state])) or "nothing (final state)"
        text = why or f"{from_state.value} -> {to_state.value} is not a legal move"
        super().__init__(f"job {job_id}: {text} (from {from_state.value} it can go to: {legal})")


class JobNotFound(LedgerError, LookupError):
    """No job has that id or id prefix."""


class AmbiguousJobId(LedgerError, LookupError):
    """An id prefix matches several jobs; the message lists some of them."""


class LeaseLost(LedgerError):
    """This host no longer holds the job: its lease expired and another host took it (fencing refused a write)."""

    def __init__(self, job_id: str, host_id: str) -> None:
        self.job_id, self.host_id = job_id, host_id
        super().__init__(f"job {job_id}: host {host_id} no longer holds its lease (it expired and the job was "
                         "taken back for another host)")
