"""Fault-test helpers: start a real `wanbox serve` that SIGKILLs itself at a named kill point (WANBOX_DIE_AT,
daemon/faults.py), wait for that death, and bring a root to rest. Used by tests/faults/test_kill_*.py.

It only starts and waits for processes of the test's own root; assertions stay in the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from daemon.faults import ENV
from tests.faults.invariants import ENDED
from tests.workers.harness import Root, wait_for


def serve_dying_at(r: Root, point: str | None) -> subprocess.Popen[bytes]:
    """`r.serve()` with WANBOX_DIE_AT=point in the daemon's environment (None: no kill point)."""
    before = os.environ.get(ENV)
    if point:
        os.environ[ENV] = point
    else:
        os.environ.pop(ENV, None)
    try:
        return r.serve()
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def wait_killed(r: Root, point: str, timeout: float = 30) -> None:
    """The daemon died by its own SIGKILL (at `point`); its pool, left orphaned, exits on its own."""
    proc = r.proc
    assert proc is not None
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon never reached kill point {point!r}\n--- log ---\n"
                             f"{r.log_text()[-3000:]}") from None
    assert code == -signal.SIGKILL, f"the daemon exited {code}, not by SIGKILL at {point!r}\n{r.log_text()[-3000:]}"
    r.proc = None


def wait_rest(r: Root, names: list[str], timeout: float = 60) -> dict[str, Any]:
    """Every named job has ended (done, failed, rejected or cancelled); returns the rows."""
    ended = {s.value for s in ENDED}

    def at_rest() -> bool:
        jobs = r.jobs()
        return all(n in jobs and jobs[n].state.value in ended for n in names)

    wait_for(at_rest, timeout, lambda: f"not at rest: { {n: r.state(n) for n in names} }\n{r.log_text()[-4000:]}")
    return r.jobs()


def stop_cleanly(r: Root) -> None:
    """SIGTERM, then wait a moment for the orphan-free state (the pool gone with it)."""
    if r.proc is not None:
        assert r.stop() == 0, r.log_text()[-3000:]
    time.sleep(0.1)
