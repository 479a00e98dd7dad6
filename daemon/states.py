"""One vocabulary for the code, the ledger, the protocol and the CLI: job states and their legal moves, the pool's
states, the kinds of error, the phases a job reports progress in.

Pure data and tiny predicates only: this module must not touch the database, the disk or any process.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """Where a job is. The value is what the database stores and the CLI prints."""

    STAGED = "staged"  # manifest seen, inputs not complete/stable/verified yet (has a deadline)
    QUEUED = "queued"  # accepted: files moved to work/<id>/, waiting for CPU preprocessing
    PREPROCESSING = "preprocessing"  # a CPU pool process is preparing its inputs
    READY = "ready"  # prepared inputs on disk, waiting for the warm GPU pool
    SAMPLING = "sampling"  # the warm pool is generating the video
    FINALIZING = "finalizing"  # the supervisor checks and delivers the mp4 + sidecar to the outbox
    DONE = "done"  # delivered
    FAILED = "failed"  # gave up after a permanent error or too many attempts (can be retried by hand)
    REJECTED = "rejected"  # the manifest or its inputs were invalid; fix and resubmit
    CANCELLED = "cancelled"  # a person cancelled it (can be retried by hand)

    def __str__(self) -> str:
        # f"{state}" and print() show "queued", not "JobState.QUEUED", in logs and the CLI.
        return self.value


class PoolState(str, Enum):
    """Where the warm pool is (daemon/pool.py)."""

    STOPPED = "stopped"  # no worker processes
    LOADING = "loading"  # launched, loading its model (until `ready`)
    IDLE = "idle"  # warm, waiting for a job
    BUSY = "busy"  # running a job

    def __str__(self) -> str:
        return self.value


class ErrorKind(str, Enum):
    """Why an attempt failed: what the worker reports (error.kind) and the ledger stores (jobs.error_kind)."""

    OOM = "oom"  # the GPUs ran out of memory: smaller size, fewer frames, more GPUs
    INPUT = "input"  # the job's own inputs or parameters cannot work: fix and resubmit
    INTERNAL = "internal"  # a bug or a resource problem, not the job's fault: retried
    CANCELLED = "cancelled"  # stopped by `wanbox cancel` or a shutdown
    POOL = "pool"  # the worker pool died or hung during the job, or could not start
    OUTPUT = "output"  # the video came back broken or could not be delivered
    INTERRUPTED = "interrupted"  # the supervisor stopped (crash, restart) while the job ran
    NUMERICS = "numerics"  # a NaN/Inf appeared in the latents or frames (the step is named): not retried
    DISK = "disk"  # a disk of this host is full: the job waits for space, its attempts untouched

    def __str__(self) -> str:
        return self.value


class Phase(str, Enum):
    """The phases a running job reports progress in (the protocol's progress.phase)."""

    LOAD = "load"
    ENCODE = "encode"
    SAMPLING = "sampling"
    DECODE = "decode"
    WRITE = "write"

    def __str__(self) -> str:
        return self.value


S = JobState

TERMINAL: frozenset[JobState] = frozenset({S.DONE, S.FAILED, S.REJECTED, S.CANCELLED})
RUNNING: frozenset[JobState] = frozenset({S.PREPROCESSING, S.SAMPLING, S.FINALIZING})
WAITING: frozenset[JobState] = frozenset({S.STAGED, S.QUEUED, S.READY})

# Every legal move, each with the reason it exists. A move not listed here is a bug in the caller and
# the ledger raises IllegalTransition instead of writing it.
EDGES: dict[tuple[JobState, JobState], str] = {
    # staged: the watcher is waiting for the upload to finish
    (S.STAGED, S.QUEUED): "every input is present, stable and verified: the job is accepted",
    (S.STAGED, S.REJECTED): "the manifest or an input is invalid, or the staging deadline passed",
    (S.STAGED, S.CANCELLED): "a person cancelled it before the upload completed",
    # queued: waiting for a CPU preprocessing slot
    (S.QUEUED, S.PREPROCESSING): "a CPU preprocessing process took it",
    (S.QUEUED, S.CANCELLED): "a person cancelled it",
    (S.QUEUED, S.FAILED): "it cannot be started at all (e.g. its work files vanished)",
    # preprocessing: CPU work (image prep, pose/face/mask extraction)
    (S.PREPROCESSING, S.READY): "prepared inputs are on disk",
    (S.PREPROCESSING, S.QUEUED): "retryable error or interrupted (supervisor died): prepare it again",
    (S.PREPROCESSING, S.FAILED): "permanent error, or out of attempts",
    (S.PREPROCESSING, S.CANCELLED): "a person cancelled it",
    # ready: waiting for the warm GPU pool
    (S.READY, S.SAMPLING): "the warm pool took it",
    (S.READY, S.QUEUED): "its prepared inputs are gone (work dir cleaned): prepare it again",
    (S.READY, S.FAILED): "it can never run here (e.g. its model is not installed)",
    (S.READY, S.CANCELLED): "a person cancelled it",
    # sampling: the GPUs are working on it
    (S.SAMPLING, S.FINALIZING): "the worker reported done with an output file",
    (S.SAMPLING, S.READY): "retryable error (oom, pool died or hung): give it to the pool again",
    (S.SAMPLING, S.QUEUED): "interrupted and its prepared inputs are gone: prepare it again",
    (S.SAMPLING, S.FAILED): "permanent error, or out of attempts",
    (S.SAMPLING, S.CANCELLED): "a person cancelled it; the pool was told to stop",
    # finalizing: checking the mp4 and delivering it to the outbox
    (S.FINALIZING, S.DONE): "the mp4 decodes and is delivered with its sidecar",
    (S.FINALIZING, S.READY): "the output was bad or lost before delivery (retryable): sample again",
    (S.FINALIZING, S.QUEUED): "interrupted and its prepared inputs are gone: prepare it again",
    (S.FINALIZING, S.FAILED): "permanent delivery error, or out of attempts",
    (S.FINALIZING, S.CANCELLED): "a person cancelled it before delivery",
    # end states a person can restart; done and rejected are final (resubmit instead)
    (S.FAILED, S.QUEUED): "`wanbox retry`: a person asked to run it again",
    (S.CANCELLED, S.QUEUED): "`wanbox retry`: a person asked to run it again",
}

ALLOWED: dict[JobState, frozenset[JobState]] = {
    state: frozenset(to for (frm, to) in EDGES if frm == state) for state in JobState
}

# Where a retryable failure sends a job back to: the step whose output was lost.
RETRY_STATE: dict[JobState, JobState] = {
    S.PREPROCESSING: S.QUEUED,
    S.SAMPLING: S.READY,
    S.FINALIZING: S.READY,
}


def is_allowed(from_state: JobState, to_state: JobState) -> bool:
    """Whether the ledger accepts a move from `from_state` to `to_state`."""
    return to_state in ALLOWED[JobState(from_state)]


def edge_reason(from_state: JobState, to_state: JobState) -> str | None:
    """Why a move exists (for `wanbox show` and error messages), or None if it is not legal."""
    return EDGES.get((JobState(from_state), JobState(to_state)))


def parse_state(text: str) -> JobState:
    """A state from user text such as `--state Queued`; a clear error names the legal values."""
    try:
        return JobState(text.strip().lower())
    except ValueError:
        legal = ", ".join(s.value for s in JobState)
        raise ValueError(f"unknown job state {text!r}: expected one of {legal}") from None


def shortest_path(from_state: JobState, to_state: JobState) -> list[JobState]:
    """The fewest legal moves from one state to another (the states after `from_state`), e.g. to drive
    a job into a given state in tests or to explain in `wanbox show` how a job could get somewhere.

    Raises ValueError when `to_state` cannot be reached (e.g. anything from `done`).
    """
    start, goal = JobState(from_state), JobState(to_state)
    came_from: dict[JobState, JobState] = {}
    frontier = [start]
    while frontier and goal not in came_from and goal != start:
        next_frontier = []
        for state in frontier:
            for nxt in sorted(ALLOWED[state], key=list(JobState).index):
                if nxt not in came_from and nxt != start:
                    came_from[nxt] = state
                    next_frontier.append(nxt)
        frontier = next_frontier
    if goal == start:
        return []
    if goal not in came_from:
        raise ValueError(f"no legal path from {start.value} to {goal.value}")
    path = [goal]
    while path[-1] in came_from and came_from[path[-1]] != start:
        path.append(came_from[path[-1]])
    return path[::-1]
