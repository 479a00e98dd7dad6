"""Liveness: the heartbeat's rows, the verdicts read from them, and a real daemon killed with SIGKILL mid-job.

Real SQLite, real flock locks and /proc/locks, real daemon processes (only the GPU model is the fake worker).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon.cli import main as cli_main
from daemon.config import PoolSettings
from daemon.heartbeat import Heartbeat, default_host_id
from daemon.hosts import Host, HostRecords
from daemon.ledger import Ledger
from daemon.liveness import daemon_timeline, judge, lock_held, read_liveness, root_lock, stale_after
from daemon.pool import WarmPool
from daemon.states import JobState, shortest_path
from tests.workers.harness import Root, manifest_text, wait_for

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger.open(tmp_path / "wanbox.db") as opened:
        yield opened


def a_pool(tmp_path: Path) -> WarmPool:
    return WarmPool(PoolSettings(device="cpu"), tmp_path / "pool.sock")  # real, never launched


def host_row(**changes) -> Host:
    values = dict(host_id="gpu7-0badf00d", hostname="gpu7", root="/srv/wanbox", run_id=1, pid=4242,
                  version="0.1.0", state="serving", heartbeat_seconds=2.0, started_at=T0, heartbeat_at=T0, quiet_until=None,
                  pool_state="busy", pool_model="i2v-A14B", pool_pid=4343, current_job="j1",
                  pool_heartbeat_at=T0, gpus_json=[], inbox_outage=None, web_url=None)  # fmt: skip
    return Host(**{**values, **changes})


def test_the_heartbeat_writes_its_rows_throttled_and_a_clean_stop_says_stopped(ledger: Ledger, tmp_path: Path) -> None:
    pool = a_pool(tmp_path)
    beat = Heartbeat(tmp_path, "9.9", interval=0.5)
    beat.start(ledger.engine)
    records = HostRecords(ledger.engine)
    [host] = records.hosts()
    assert (host.host_id, host.state, host.pid, host.version) == (default_host_id(tmp_path), "starting",
                                                                  os.getpid(), "9.9")
    beat.beat(pool, None)  # starting -> serving: written at once
    first = records.hosts()[0]
    assert first.state == "serving" and first.pool_state == "stopped" and first.gpus_json == []
    beat.beat(pool, "the inbox is gone")  # within the interval, same state: not written
    assert records.hosts()[0].heartbeat_at == first.heartbeat_at and records.hosts()[0].inbox_outage is None
    time.sleep(0.55)
    pool.state, pool.model, pool.launches, pool.deaths = "idle", "i2v-A14B", 3, 2
    beat.beat(pool, "the inbox is gone")
    later = records.hosts()[0]
    assert later.heartbeat_at > first.heartbeat_at and later.inbox_outage == "the inbox is gone"
    assert (later.pool_state, later.pool_model) == ("idle", "i2v-A14B")
    assert records.pool_totals(beat.host_id) == (3, 2)
    pool.job = "j1"
    beat.stopping(pool, None, stop_grace_seconds=10.0)  # a job is still finishing its step
    drain = records.hosts()[0]
    assert drain.state == "draining" and drain.current_job == "j1"
    assert 59 <= (drain.quiet_until - drain.heartbeat_at).total_seconds() <= 61  # 1.5 x grace + 45 s
    pool.job = None
    beat.stop(pool)
    assert records.hosts()[0].quiet_until is None
    [run] = records.runs(T0)
    assert records.hosts()[0].state == "stopped" and run.stopped_at is not None
    view = read_liveness(ledger.engine, tmp_path, tmp_path)
    assert view.daemon is not None and view.daemon.verdict == "stopped" and not view.anyone_alive


def test_verdicts_from_the_heartbeat_age_the_state_and_the_lock() -> None:
    assert stale_after(2.0) == 10.0 and stale_after(5.0) == 15.0
    fresh = judge(host_row(), T0 + timedelta(seconds=3))
    assert fresh.alive and fresh.verdict == "alive"
    old = judge(host_row(), T0 + timedelta(seconds=11))
    assert old.verdict == "gone" and "no heartbeat for 11s" in old.reason and not old.alive
    assert judge(host_row(state="stopped"), T0 + timedelta(hours=2)).verdict == "stopped"
    freed = judge(host_row(), T0 + timedelta(seconds=1), lock_free=True)
    assert freed.verdict == "gone" and "root lock is free" in freed.reason
    # A graceful stop promised silence while it drains: alive until then, gone after (or at once if the lock is free).
    draining = host_row(state="draining", quiet_until=T0 + timedelta(seconds=90))
    assert judge(draining, T0 + timedelta(seconds=60)).alive
    assert "graceful stop" in judge(draining, T0 + timedelta(seconds=60)).reason
    assert judge(draining, T0 + timedelta(seconds=91)).verdict == "gone"
    assert judge(draining, T0 + timedelta(seconds=5), lock_free=True).verdict == "gone"


def test_lock_held_sees_a_real_flock_without_taking_it(tmp_path: Path) -> None:
    # One lock per host id (several hosts may serve one shared root); a name any host id can be in.
    assert root_lock("gpu7-1a2b3c4d") == "serve.gpu7-1a2b3c4d.lock" and root_lock("a/b c") == "serve.a_b_c.lock"
    path = tmp_path / root_lock("gpu7")
    assert lock_held(path) is None  # no file: cannot tell
    with open(path, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(path) is True
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert lock_held(path) is False
    assert lock_held(path, locks_text="1: FLOCK  ADVISORY  WRITE 99 fe:00:1 0 EOF\n") is False


def test_a_jobs_timeline_shows_a_death_the_gap_and_the_restart(ledger: Ledger) -> None:
    records = HostRecords(ledger.engine)
    fields = dict(hostname="gpu7", root="/srv", pid=1, version="0.1.0", state="serving", heartbeat_seconds=2.0)
    first = records.begin_run("gpu7-1", T0, **fields)
    records.beat("gpu7-1", first, T0 + timedelta(seconds=30), 1, 0)  # then SIGKILL: no more beats
    second = records.begin_run("gpu7-1", T0 + timedelta(seconds=90), **{**fields, "pid": 2})
    records.end_run("gpu7-1", second, T0 + timedelta(seconds=120))
    lines = daemon_timeline(records, T0 + timedelta(seconds=10), T0 + timedelta(seconds=200), lambda run: False)
    assert [(at - T0).total_seconds() for at, _ in lines] == [30, 90, 120]
    assert "DIED (pid 1)" in lines[0][1] and "started again 60s later" in lines[0][1]
    assert "started" in lines[1][1] and "pid 2" in lines[1][1] and lines[2][1] == "daemon stopped cleanly"
    # A run that is still alive has no end; one not alive and never followed ended at its last beat.
    third = records.begin_run("gpu7-1", T0 + timedelta(seconds=300), **{**fields, "pid": 3})
    assert [t for _, t in daemon_timeline(records, T0 + timedelta(seconds=250), T0 + timedelta(seconds=400),
                                          lambda run: run.id == third)] == [
        "daemon started on gpu7-1 (pid 3, wanbox 0.1.0)"]  # fmt: skip


def test_without_any_daemon_row_in_flight_jobs_are_stale(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    (root / "state").mkdir(parents=True)
    with Ledger.open(root / "state" / "wanbox.db") as ledger:
        job = ledger.add_staged("cat", "i2v", "inbox/cat.toml", None)
        current = JobState.STAGED
        for nxt in shortest_path(JobState.STAGED, JobState.SAMPLING):
            ledger.transition(job.id, current, nxt, f"to {nxt}")
            current = nxt
    assert cli_main(["status", "--json", "--root", str(root)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["daemon"] is None and status["hosts"] == []
    assert status["jobs"][0]["state"] == "sampling" and status["jobs"][0]["stale"] is True
    assert cli_main(["status", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "daemon: NONE has ever run" in text and "STALE, the daemon is gone" in text


def _status(r: Root, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert cli_main(["status", "--json", "--config", str(r.config)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_mid_job_status_says_the_daemon_is_gone_and_show_records_the_gap(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = Root(tmp_path)
    r.knobs({"long": {"step_seconds": 0.3}})
    try:
        r.serve()
        r.drop("long", manifest_text(steps=30, prompt="long"))
        job = r.wait_state("long", "sampling")
        wait_for(lambda: _status(r, capsys)["daemon"]["pool"]["state"] == "busy", 10, "the pool never showed busy")
        alive = _status(r, capsys)
        assert alive["daemon"]["alive"] is True and alive["daemon"]["verdict"] == "alive"
        assert alive["daemon"]["pid"] == r.proc.pid and alive["daemon"]["pool"]["job"] == job.id
        assert alive["daemon"]["heartbeat_age_seconds"] < 5 and alive["jobs"][0]["stale"] is False

        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: _status(r, capsys)["daemon"]["alive"] is False, 5, "status still says the daemon is alive")
        assert time.monotonic() - killed_at < 5
        gone = _status(r, capsys)
        assert gone["daemon"]["verdict"] == "gone" and gone["daemon"]["state"] == "serving"  # it never said goodbye
        assert [j["stale"] for j in gone["jobs"] if j["id"] == job.id] == [True]
        assert cli_main(["status", "--config", str(r.config)]) == 0
        table = capsys.readouterr().out
        assert "daemon: GONE" in table and "STALE, the daemon is gone" in table and "ETA" not in table

        r.serve()  # the restart recovers the job and runs it to the end
        r.knobs({"long": {"step_seconds": 0.01}})
        r.wait_state("long", "done", timeout=60)
        assert cli_main(["show", job.id, "--json", "--config", str(r.config)]) == 0
        shown = json.loads(capsys.readouterr().out)
        died = [e for e in shown["daemon_events"] if "DIED" in e["message"]]
        recovered = [e for e in shown["events"] if e["message"].startswith("recovered at start-up")]
        assert len(died) == 1 and "started again" in died[0]["message"] and len(recovered) == 1
        assert died[0]["at"] <= recovered[0]["at"]
        assert any(e["message"].startswith("daemon started") for e in shown["daemon_events"])
        assert cli_main(["show", job.id, "--config", str(r.config)]) == 0
        assert "daemon DIED" in capsys.readouterr().out
        assert r.stop() == 0
        stopped = _status(r, capsys)
        assert stopped["daemon"]["verdict"] == "stopped" and not any(j["stale"] for j in stopped["jobs"])
    finally:
        r.cleanup()
