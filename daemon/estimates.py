"""Honest ETAs: how long a job still needs, and when a waiting one will be done, from the phase times measured on
earlier jobs of the same model, size and frame count, refined by a running job's own pace.

Reads the ledger only. Without a measured job of the same model, size and frames it says nothing (None:
"no estimate yet") rather than a number it cannot back.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from daemon.states import JobState

S = JobState
HISTORY = 50  # delivered jobs looked at, newest first
SAMPLING_PHASES = ("sampling",)  # the worker's phase whose time scales with the step count


@dataclass(frozen=True)
class Profile:
    """Median times of earlier jobs of one model, size and frame count."""

    prepare_s: float  # CPU preparation
    fixed_s: float  # pool time that does not scale with the steps: text encoder, VAE encode, decode, write
    step_s: float  # per denoising step (as the manifest counts steps)
    deliver_s: float  # checking and publishing the outputs
    jobs: int

    def pool_s(self, steps: int) -> float:
        return self.fixed_s + steps * self.step_s


def job_key(record: Any) -> tuple[str, str, int | None] | None:
    """(model, size, frames): what a job's times depend on besides its step count; None without a stored job."""
    if not record.params_json:
        return None
    job = record.job
    return (job.model_id, job.video.size, job.video.frames)


def _steps(record: Any) -> int:
    return record.job.sampling.steps


def profiles(done: Iterable[Any]) -> dict[tuple[str, str, int | None], Profile]:
    """One Profile per key from delivered jobs that have their timings."""
    samples: dict[tuple[str, str, int | None], list[tuple[float, float, float, float]]] = {}
    for record in done:
        t, key = record.timings_json or {}, job_key(record)
        if key is None or "sampling_wall" not in t or "sampling" not in t:
            continue
        steps = max(_steps(record), 1)
        fixed = max(t["sampling_wall"] - t["sampling"], 0.0)
        samples.setdefault(key, []).append((t.get("preprocess", 0.0), fixed, t["sampling"] / steps,
                                            t.get("deliver", 0.0)))
    return {key: Profile(*(statistics.median(column) for column in zip(*rows, strict=True)), jobs=len(rows))
            for key, rows in samples.items()}


class Estimates:
    """ETAs for the jobs of one ledger snapshot (build one per `status` or page refresh)."""

    def __init__(self, ledger: Any, now: datetime | None = None) -> None:
        self.now = now or datetime.now(timezone.utc)
        self.profiles = profiles(ledger.list(states=[S.DONE], limit=HISTORY))

    def profile(self, record: Any) -> Profile | None:
        key = job_key(record)
        return self.profiles.get(key) if key is not None else None

    def remaining(self, record: Any) -> float | None:
        """Seconds until the job is delivered, from where it is now; None when unknown."""
        p = self.profile(record)
        if p is None:
            return None
        elapsed = max((self.now - record.updated_at).total_seconds(), 0.0)  # in its current state
        steps = _steps(record)
        if record.state in (S.STAGED, S.QUEUED):
            return p.prepare_s + p.pool_s(steps) + p.deliver_s
        if record.state == S.PREPROCESSING:
            return max(p.prepare_s - elapsed, 0.0) + p.pool_s(steps) + p.deliver_s
        if record.state == S.READY:
            return p.pool_s(steps) + p.deliver_s
        if record.state == S.SAMPLING:
            return self._sampling_left(record, p, steps, elapsed) + p.deliver_s
        if record.state == S.FINALIZING:
            return max(p.deliver_s - elapsed, 0.0)
        return 0.0

    def _sampling_left(self, record: Any, p: Profile, steps: int, elapsed: float) -> float:
        """On the pool: the steps left at this job's own pace once it has one, then the rest of the fixed part."""
        total, done = record.total_steps, record.step
        if record.phase == "sampling" and done and total and record.progress_at is not None:
            into = max((record.progress_at - record.updated_at).total_seconds(), 0.0)
            before = p.fixed_s * 0.5  # roughly: text encoder and VAE encode come first, decode and write after
            pace = max(into - before, 0.0) / done if done >= 2 else p.step_s * steps / total
            since = max((self.now - record.progress_at).total_seconds(), 0.0)
            return max((total - done) * pace - since, 0.0) + p.fixed_s - before
        return max(p.pool_s(steps) - elapsed, 0.0)

    def total(self, record: Any) -> float | None:
        """The whole job's expected duration, from acceptance to delivery."""
        p = self.profile(record)
        return None if p is None else p.prepare_s + p.pool_s(_steps(record)) + p.deliver_s

    def queue(self, records: list[Any]) -> dict[str, tuple[int, float | None]]:
        """Per job waiting for the GPU pool (queued, preparing, ready; in the order the pool takes them):
        (position, seconds until it is delivered).

        The pool runs one job at a time; preparations run beside it on the CPU, so a job is done after the pool
        time of the jobs ahead of it or its own preparation, whichever is longer, plus its own pool time. None
        from the first job with nothing to go by onwards."""
        on_pool = [r for r in records if r.state in (S.SAMPLING, S.FINALIZING)]
        left = [self.remaining(r) for r in on_pool]
        ahead: float | None = None if any(x is None for x in left) else sum(x or 0.0 for x in left)
        waiting = sorted((r for r in records if r.state in (S.QUEUED, S.PREPROCESSING, S.READY)), key=claim_order)
        found: dict[str, tuple[int, float | None]] = {}
        for position, record in enumerate(waiting, start=1):
            p = self.profile(record)
            if ahead is None or p is None:
                found[record.id], ahead = (position, None), None
                continue
            ahead = max(ahead, self._prepare_left(record, p)) + p.pool_s(_steps(record)) + p.deliver_s
            found[record.id] = (position, round(ahead, 1))
        return found

    def _prepare_left(self, record: Any, p: Profile) -> float:
        if record.state == S.QUEUED:
            return p.prepare_s
        if record.state == S.PREPROCESSING:
            return max(p.prepare_s - (self.now - record.updated_at).total_seconds(), 0.0)
        return 0.0


@dataclass(frozen=True)
class JobEta:
    """What `status`, `status --json` and the page say about one job's time."""

    remaining_s: float | None  # until it is delivered (None: no estimate yet)
    total_s: float | None  # the whole job, from acceptance to delivery
    queue_position: int | None  # among the jobs waiting for the GPU pool (1 = next)


def job_etas(ledger: Any, now: datetime | None = None) -> dict[str, JobEta]:
    """Every active job's ETA, from one read of the ledger."""
    estimates = Estimates(ledger, now)
    active = ledger.list(states=[S.STAGED, S.QUEUED, S.PREPROCESSING, S.READY, S.SAMPLING, S.FINALIZING],
                         limit=None)
    queue = estimates.queue(active)
    found = {}
    for record in active:
        position, eta = queue.get(record.id, (None, None))
        remaining = eta if record.id in queue else estimates.remaining(record)
        found[record.id] = JobEta(None if remaining is None else round(remaining, 1),
                                  None if (t := estimates.total(record)) is None else round(t, 1), position)
    return found


def claim_order(record: Any) -> tuple[Any, ...]:
    """The order the pool takes ready work in: priority first, then age (the ledger's rule, loaded-model aside)."""
    return (-record.priority, record.created_at, record.id)
