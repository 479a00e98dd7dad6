"""A preparation that stops making progress is killed after [preprocess] stall_seconds and its job retried;
the job preparing beside it is requeued, not failed. A real daemon, real CPU pool processes; the hang is
injected by a start-up hook (tests/workers/stall_preprocess) since no real input may hang on purpose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.workers.harness import Root, manifest_text, wait_for

STALL_HOOK = Path(__file__).parent / "workers" / "stall_preprocess"

pytestmark = pytest.mark.timeout(300)


def test_a_stuck_preparation_is_killed_and_its_job_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "stalled-once"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(STALL_HOOK), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WANBOX_TEST_STALL_MARKER", str(marker))
    r = Root(tmp_path, preprocess={"workers": 2, "stall_seconds": 3}, jobs={"max_attempts": 3})
    try:
        r.serve()
        r.drop("wedged", manifest_text(image='"a.jpg"', prompt="hangs the first time"), image="a.jpg")
        wait_for(marker.exists, 60, lambda: f"the hook never ran\n{r.log_text()[-2000:]}")
        job = r.wait_state("wedged", "done", timeout=90)
        with r.ledger() as ledger:
            messages = [e.message for e in ledger.events(job.id)]
        stalled = [m for m in messages if "preprocessing made no progress for 3 s" in m]
        assert stalled and "stall_seconds" in stalled[0], messages
        assert "restarting the CPU pool" in r.log_text()
        r.drop("after", manifest_text(image='"b.jpg"', prompt="the new CPU pool works"), image="b.jpg")
        assert r.wait_state("after", "done", timeout=60).attempts == 0
        assert r.stop() == 0
    finally:
        r.cleanup()


def test_a_cpu_pool_killed_while_its_processes_start_runs_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    """kill() right after the pool is made, while its spawned processes still import: none is known by its pid
    yet, so none can be SIGKILLed; each must see the pool killed as it starts, take no work and end."""
    import multiprocessing

    from daemon.preparation import CpuPool

    before = {p.pid for p in multiprocessing.active_children()}
    pool = CpuPool(2)
    ran = tmp_path / "ran"
    for _ in range(4):
        pool.submit(ran.touch)
    pool.kill()
    started = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert started, "the pool spawned no process"
    for process in started:
        process.join(60)
    assert [p.pid for p in started if p.is_alive()] == [], "a process of the killed pool is still running"
    assert not ran.exists(), "a process of the killed pool took work"
