"""Honest ETAs: nothing is estimated before a job like it has run; after one, a second identical job's estimate,
taken when it is accepted, is within 25% of how long it really took (a real daemon, the fake pool worker).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon.estimates import Estimates, job_etas
from daemon.ledger import Ledger
from daemon.states import JobState
from tests.jobs import resolved_job
from tests.workers.harness import Root, manifest_text

S = JobState
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def delivered(ledger: Ledger, name: str, timings: dict[str, float], steps: int = 10) -> str:
    row = ledger.add_staged(name, "i2v", f"/inbox/{name}.toml", None, now=T0)
    ledger.transition(row.id, S.STAGED, S.QUEUED, "accepted", params_json=resolved_job(name=name, steps=steps).to_dict(),
                      now=T0)
    for frm, to in ((S.QUEUED, S.PREPROCESSING), (S.PREPROCESSING, S.READY), (S.READY, S.SAMPLING),
                    (S.SAMPLING, S.FINALIZING), (S.FINALIZING, S.DONE)):
        ledger.transition(row.id, frm, to, "on", now=T0)
    for phase, seconds in timings.items():
        ledger.record_timing(row.id, phase, seconds)
    return row.id


def test_no_estimate_without_a_job_like_it_then_one_from_the_measured_phases(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.db") as ledger:
        waiting = ledger.add_staged("next", "i2v", "/inbox/next.toml", None, now=T0)
        ledger.transition(waiting.id, S.STAGED, S.QUEUED, "accepted",
                          params_json=resolved_job(name="next", steps=20).to_dict(), now=T0)
        assert job_etas(ledger)[waiting.id].remaining_s is None  # the first of its kind: no estimate yet
        delivered(ledger, "earlier", {"preprocess": 2.0, "sampling_wall": 16.0, "sampling": 10.0, "deliver": 1.0})
        eta = job_etas(ledger)[waiting.id]
        # 20 steps at the measured 1 s per step, plus the fixed 6 s on the pool, preparation and delivery
        assert eta.remaining_s == eta.total_s == 2.0 + 6.0 + 20 * 1.0 + 1.0 and eta.queue_position == 1
        other = ledger.add_staged("big", "i2v", "/inbox/big.toml", None, now=T0)
        ledger.transition(other.id, S.STAGED, S.QUEUED, "accepted",
                          params_json=resolved_job(name="big", size="1280*720").to_dict(), now=T0)
        assert job_etas(ledger)[other.id].remaining_s is None  # another size: nothing to go by
        ledger.transition(waiting.id, S.QUEUED, S.PREPROCESSING, "prep", now=T0)
        ledger.transition(waiting.id, S.PREPROCESSING, S.READY, "ready", now=T0)
        ledger.transition(waiting.id, S.READY, S.SAMPLING, "sent", now=T0)
        ledger.record_progress(waiting.id, "sampling", 10, 20, now=T0 + timedelta(seconds=3 + 20))  # 2 s a step
        at = Estimates(ledger, now=T0 + timedelta(seconds=23))
        # its own pace (2 s a step, after ~3 s of encoding) for the 10 steps left, then the rest of the pool's part
        assert at.remaining(ledger.get(waiting.id)) == pytest.approx(10 * 2.0 + 3.0 + 1.0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_second_identical_jobs_estimate_is_within_a_quarter_of_its_real_duration(tmp_path: Path) -> None:
    r = Root(tmp_path, inbox={"dedupe": "run", "settle_seconds": 0.2})
    r.knobs({"*": {"step_seconds": 0.25}})
    text = manifest_text(steps=12, sampling="seed = 3")
    try:
        r.serve()
        r.drop("first", text)
        while r.state("first") is None:
            time.sleep(0.05)
        with r.ledger() as ledger:
            deadline = time.monotonic() + 60
            first_said = set()
            while r.state("first") != "done" and time.monotonic() < deadline:
                job = r.job("first")
                if job is not None and job.id in (etas := job_etas(ledger)):
                    first_said.add(etas[job.id].remaining_s)
                time.sleep(0.05)
            assert r.state("first") == "done" and first_said == {None}  # never a made-up number
            assert "no estimate yet" not in r.cli("status").stdout  # nothing active now
            r.drop("second", text)
            while (job := r.job("second")) is None or job.state == S.STAGED:
                assert time.monotonic() < deadline + 30, r.log_text()[-2000:]
                time.sleep(0.02)
            estimate = job_etas(ledger)[job.id].total_s  # the whole job, as estimated once it is accepted
            r.wait_state("second", "done", timeout=60)
            events = ledger.events(job.id)
            accepted = next(e.at for e in events if e.to_state == S.QUEUED)
            took = (events[-1].at - accepted).total_seconds()
        assert estimate is not None and abs(estimate - took) <= 0.25 * took, (estimate, took)
    finally:
        if r.proc is not None:
            r.stop()
        r.cleanup()
