"""Notifications when a job ends, against a REAL local HTTP receiver (http.server in a thread) and real commands:
down at first then up, the daemon restarted (and killed) between attempts, a hanging receiver, a give-up deadline,
the post-job command with its environment and its timeout. Real SQLite ledger files throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from daemon import webhooks
from daemon.config import NotifySettings
from daemon.deliveries import DeliveryStore
from daemon.ledger import Ledger
from daemon.notifications import JobTargets, Notifications, job_payload, notification_lines
from daemon.states import JobState
from tests.jobs import resolved_job
from tests.notify_receiver import HangingReceiver, Receiver, free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-key"
FAST = NotifySettings(secret=SECRET, timeout_seconds=2.0, retry_base_seconds=0.2, retry_cap_seconds=0.4,
                      give_up_after_seconds=60.0)  # fmt: skip


def wait_for(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "wanbox.db") as opened:
        yield opened


def rejected_job(ledger: Ledger, name: str = "cat") -> tuple[str, dict]:
    """A real job row driven to `rejected` (the reason recorded), and its payload."""
    job = ledger.add_staged(name, "i2v", f"inbox/{name}.toml", None,
                            params_json=resolved_job(name=name, seed=7).to_dict())  # fmt: skip
    why = "inputs.image = 'nothere.jpg': the file is not in the inbox (yet)"
    ledger.transition(job.id, JobState.STAGED, JobState.REJECTED, f"rejected: {why}", last_error=why,
                      error_kind="input", outputs_json={"failed_dir": "/srv/failed/cat"})  # fmt: skip
    return job.id, job_payload(ledger.get(job.id))


def rows(ledger: Ledger, job_id: str) -> list:
    return DeliveryStore(ledger).for_job(job_id)


def test_a_receiver_down_at_first_gets_the_signed_delivery_after_the_retry_exactly_once(ledger: Ledger) -> None:
    receiver = Receiver()  # its port is closed until start()
    notes = Notifications(ledger, replace(FAST, urls=(receiver.url,)), poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        [nid] = notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][1], what="the first attempt")
        first = rows(ledger, job_id)[0]
        assert first[0].state == "pending" and first[1][0].status is None
        assert first[1][0].detail == "connection refused" and "retrying in" in first[0].last_result
        receiver.start()
        wait_for(lambda: rows(ledger, job_id)[0][0].state == "delivered", what="the delivery")
        time.sleep(0.6)  # longer than the backoff: a second POST would have come by now
    finally:
        notes.stop()
        receiver.stop()
    assert len(receiver.received) == 1
    got = receiver.received[0]
    assert got.path == "/hooks/wanbox?token=abc"
    assert webhooks.verify(got.body, SECRET, got.headers["X-Wanbox-Signature"])
    assert not webhooks.verify(got.body, "another-secret", got.headers["X-Wanbox-Signature"])
    doc = got.document
    assert doc["event"] == "rejected" and doc["delivery"] == nid == int(got.headers["X-Wanbox-Delivery"])
    assert doc["timestamp"] == int(got.headers["X-Wanbox-Timestamp"]) and abs(doc["timestamp"] - time.time()) < 30
    job = doc["job"]
    assert (job["job_id"], job["name"], job["kind"], job["state"], job["seed"]) == (job_id, "cat", "i2v", "rejected", 7)
    assert "nothere.jpg" in job["error"] and job["outputs"] == {"failed_dir": "/srv/failed/cat"}
    note, tries = rows(ledger, job_id)[0]
    assert note.attempts == 2 and [t.status for t in tries] == [None, 200] and note.last_result == "HTTP 200"
    lines = notification_lines(ledger, job_id)
    shown = f"http://127.0.0.1:{receiver.port}/hooks/wanbox?…"  # the token in the query is not shown
    assert lines[0] == f"notified (rejected, server) {shown}: HTTP 200"
    assert "connection refused" in lines[1] and "token=abc" not in "\n".join(lines)


def test_the_daemon_restarted_between_attempts_still_delivers(tmp_path: Path) -> None:
    receiver = Receiver()
    settings = replace(FAST, urls=(receiver.url,), retry_base_seconds=0.5)
    with Ledger.open(tmp_path / "wanbox.db") as ledger:
        first = Notifications(ledger, settings, poll_seconds=0.05)
        first.start()
        job_id, payload = rejected_job(ledger)
        first.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][1], what="the first attempt")
        first.stop()
    receiver.start()
    try:
        with Ledger.open(tmp_path / "wanbox.db") as ledger:
            second = Notifications(ledger, settings, poll_seconds=0.05)
            second.start()
            wait_for(lambda: rows(ledger, job_id)[0][0].state == "delivered", what="delivery after the restart")
            second.stop()
            note, tries = rows(ledger, job_id)[0]
    finally:
        receiver.stop()
    assert len(receiver.received) == 1 and note.attempts == 2
    assert [t.detail for t in tries][0] == "connection refused"


SENDER = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    from daemon.config import NotifySettings
    from daemon.ledger import Ledger
    from daemon.notifications import Notifications, job_payload
    ledger = Ledger.open(sys.argv[1])
    notes = Notifications(ledger, NotifySettings(urls=(sys.argv[2],), timeout_seconds=3.0),
                          poll_seconds=0.05, lease_margin=timedelta(seconds=0))
    notes.start()
    job = ledger.list(limit=1)[0]
    notes.job_ended(job.id, "rejected", job_payload(job))
    print("sent", flush=True)
    time.sleep(60)
""")


@pytest.mark.slow
def test_a_daemon_killed_mid_attempt_leaves_it_to_the_next_one(tmp_path: Path) -> None:
    """SIGKILL while a POST hangs: the claim's lease runs out and the next daemon delivers (at least once)."""
    hanging, receiver = HangingReceiver(), Receiver().start()
    db = tmp_path / "wanbox.db"
    with Ledger.open(db) as ledger:
        job_id, _ = rejected_job(ledger)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(db), hanging.url], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"sent\n"
        wait_for(lambda: hanging.connections, what="the hanging POST")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Ledger.open(db) as ledger:
        [(note, tries)] = rows(ledger, job_id)
        assert note.state == "pending" and tries == []  # the killed attempt left no record, only its lease
        # The next daemon has the receiver at a working address (the same row, its URL fixed by the operator).
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE notifications SET target = ?", (receiver.url,))
        notes = Notifications(ledger, replace(FAST, timeout_seconds=30.0), poll_seconds=0.05)
        notes.start()
        wait_for(lambda: rows(ledger, job_id)[0][0].state == "delivered", timeout=45, what="delivery after the lease")
        notes.stop()
    hanging.close()
    receiver.stop()
    assert len(receiver.received) == 1 and receiver.received[0].document["job"]["job_id"] == job_id


def test_a_hanging_receiver_blocks_neither_the_caller_nor_the_other_receivers(ledger: Ledger) -> None:
    hanging, receiver = HangingReceiver(), Receiver().start()
    notes = Notifications(ledger, replace(FAST, urls=(receiver.url,), timeout_seconds=1.5), poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        started = time.monotonic()
        notes.job_ended(job_id, "rejected", payload, JobTargets(urls=(hanging.url,)))
        assert time.monotonic() - started < 0.5  # only rows were written
        wait_for(lambda: receiver.received, timeout=5, what="the good receiver")
        delivered_after = time.monotonic() - started
        wait_for(lambda: hanging.connections, what="the hanging POST")
        by_target = {note.target: (note, tries) for note, tries in rows(ledger, job_id)}
        assert by_target[hanging.url][1] == []  # still in flight while the other one was delivered
        wait_for(lambda: {n.target: t for n, t in rows(ledger, job_id)}[hanging.url], timeout=5, what="timeout")
    finally:
        notes.stop()
        hanging.close()
        receiver.stop()
    assert delivered_after < 1.5  # sooner than the hanging request's timeout
    by_target = {note.target: (note, tries) for note, tries in rows(ledger, job_id)}
    slow, slow_tries = by_target[hanging.url]
    assert slow.scope == "job" and slow.state == "pending" and slow_tries[0].detail == "no answer within 1.5 s"
    assert by_target[receiver.url][0].state == "delivered"


def test_retries_stop_at_the_deadline_with_the_reason(ledger: Ledger) -> None:
    receiver = Receiver(status=503).start()
    settings = replace(FAST, urls=(receiver.url,), retry_base_seconds=0.05, retry_cap_seconds=0.1,
                       give_up_after_seconds=0.6, secret="")  # fmt: skip
    notes = Notifications(ledger, settings, poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][0].state == "failed", what="giving up")
    finally:
        notes.stop()
        receiver.stop()
    note, tries = rows(ledger, job_id)[0]
    assert note.last_result.startswith(f"gave up after {len(tries)} attempts over ")
    assert "HTTP 503 Service Unavailable: ok" in note.last_result
    assert len(tries) == len(receiver.received) >= 3  # backoff 0.05, 0.1, 0.1 ... within 0.6 s
    assert "X-Wanbox-Signature" not in receiver.received[0].headers  # no secret: unsigned
    assert notification_lines(ledger, job_id)[0].startswith("failed (rejected, server) ")


def test_who_is_told_server_and_job_urls_events_and_the_command(ledger: Ledger) -> None:
    a, b = "https://a.example/hook", "https://b.example/hook"
    settings = NotifySettings(urls=(a,), events=("failed",), command=("notify-send", "x"), command_events=("done",))
    notes = Notifications(ledger, settings)
    job = JobTargets(urls=(a, b), events=("done", "failed"))
    assert [(o.channel, o.scope, o.target) for o in notes.owed("failed", job)] == [
        ("webhook", "server", a), ("webhook", "job", b)]  # a once, though both name it
    assert [(o.channel, o.scope, o.target) for o in notes.owed("done", job)] == [
        ("webhook", "job", a), ("webhook", "job", b), ("command", "server", '["notify-send", "x"]')]
    assert notes.owed("rejected", job) == []
    refused = Notifications(ledger, replace(settings, job_urls=False))
    assert [o.target for o in refused.owed("failed", job)] == [a]


def test_job_ended_never_raises_into_the_loop(ledger: Ledger) -> None:
    notes = Notifications(ledger, NotifySettings(urls=("https://a.example/hook",)))
    assert notes.job_ended("no-such-job", "done", {}) == []  # the foreign key refuses it: logged, not raised


def test_the_command_gets_the_jobs_facts_and_its_output_is_recorded(ledger: Ledger, tmp_path: Path) -> None:
    dump = tmp_path / "env.json"
    script = ("import json, os, sys; json.dump({k: v for k, v in os.environ.items() if k.startswith('WANBOX_')}, "
              f"open({str(dump)!r}, 'w')); print('archived', os.environ['WANBOX_JOB_NAME'])")
    settings = NotifySettings(command=(sys.executable, "-c", script), command_timeout_seconds=20.0)
    notes = Notifications(ledger, settings, poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][0].state != "pending", what="the command")
    finally:
        notes.stop()
    env = json.loads(dump.read_text())
    assert env["WANBOX_JOB_ID"] == job_id and env["WANBOX_JOB_NAME"] == "cat" and env["WANBOX_STATE"] == "rejected"
    assert env["WANBOX_FAILED_DIR"] == "/srv/failed/cat" and env["WANBOX_VIDEO"] == "" and env["WANBOX_SEED"] == "7"
    assert "nothere.jpg" in env["WANBOX_ERROR"] and json.loads(env["WANBOX_PAYLOAD"])["job_id"] == job_id
    note, [attempt] = rows(ledger, job_id)[0]
    assert note.state == "delivered" and attempt.status == 0 and attempt.detail == "exit status 0; output: archived cat"
    assert notification_lines(ledger, job_id)[0].startswith("ran (rejected, server) ")


def test_a_hanging_command_is_killed_at_its_timeout_with_its_children(ledger: Ledger, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    settings = NotifySettings(command=("sh", "-c", f"echo started; sleep 30 & echo $$ $! > {pids}; wait"),
                              command_timeout_seconds=0.5)  # fmt: skip
    notes = Notifications(ledger, settings, poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        started = time.monotonic()
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][0].state != "pending", what="the killed command")
        took = time.monotonic() - started
    finally:
        notes.stop()
    note, [attempt] = rows(ledger, job_id)[0]
    assert note.state == "failed" and attempt.status is None
    assert attempt.detail == "killed after the 0.5 s timeout; output: started"
    assert 0.5 <= took < 5
    for pid in map(int, pids.read_text().split()):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert ledger.get(job_id).state == JobState.REJECTED  # the job itself is untouched


def test_a_failing_command_is_recorded_once_and_not_retried(ledger: Ledger) -> None:
    settings = NotifySettings(command=("sh", "-c", "echo no space left >&2; exit 3"), command_timeout_seconds=20.0)
    notes = Notifications(ledger, settings, poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][0].state != "pending", what="the command")
        time.sleep(0.2)
    finally:
        notes.stop()
    note, tries = rows(ledger, job_id)[0]
    assert note.state == "failed" and [t.status for t in tries] == [3]
    assert note.last_result == "exit status 3; output: no space left"


def test_a_command_that_cannot_start_says_so(ledger: Ledger, tmp_path: Path) -> None:
    notes = Notifications(ledger, NotifySettings(command=(str(tmp_path / "missing-script"),)), poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][0].state != "pending", what="the command")
    finally:
        notes.stop()
    assert rows(ledger, job_id)[0][0].last_result.startswith(f"could not start {tmp_path / 'missing-script'}: ")


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    import hashlib
    import hmac

    data = webhooks.body("done", 3, {"job_id": "x"}, 1_700_000_000)
    expected = hmac.new(b"k", data, hashlib.sha256).hexdigest()
    assert webhooks.signature(data, "k") == f"sha256={expected}"
    assert webhooks.verify(data, "k", f"sha256={expected}")
    assert not webhooks.verify(data + b" ", "k", f"sha256={expected}")
    assert webhooks.display_url("https://user:pw@hooks.example:8443/a/b?token=t") == "https://hooks.example:8443/a/b?…"


def test_a_redirect_is_reported_not_followed(ledger: Ledger) -> None:
    receiver = Receiver(status=302).start()
    try:
        outcome = webhooks.post(receiver.url, b"{}", {"Content-Type": "application/json"}, 2.0)
    finally:
        receiver.stop()
    assert not outcome.ok and outcome.status == 302 and outcome.detail.startswith("HTTP 302 Found")
    assert webhooks.post(f"http://127.0.0.1:{free_port()}/", b"{}", {}, 2.0).detail == "connection refused"


def test_payload_of_a_delivered_job_has_the_sidecars_essentials(ledger: Ledger) -> None:
    job = ledger.add_staged("lighthouse", "i2v", "inbox/lighthouse.toml", None, model_id="i2v-A14B",
                            params_json=resolved_job(name="lighthouse", seed=42).to_dict())  # fmt: skip
    path = [JobState.QUEUED, JobState.PREPROCESSING, JobState.READY, JobState.SAMPLING, JobState.FINALIZING]
    current = JobState.STAGED
    for state in path:
        ledger.transition(job.id, current, state, f"to {state}")
        current = state
    ledger.record_timing(job.id, "sampling", 12.5)
    outputs = {"video": "/out/lighthouse.mp4", "poster": "/out/lighthouse.jpg", "sidecar": "/out/lighthouse.json"}
    ledger.transition(job.id, current, JobState.DONE, "delivered", outputs_json=outputs, gpu_seconds=50.0,
                      last_error="an earlier attempt's error")  # fmt: skip
    payload = job_payload(ledger.get(job.id))
    assert payload["state"] == "done" and payload["outputs"] == outputs and payload["seed"] == 42
    assert payload["timings_seconds"] == {"sampling": 12.5} and payload["gpu_seconds"] == 50.0
    assert payload["error"] is None and payload["model_id"] == "i2v-A14B"
    assert json.loads(json.dumps(payload)) == payload  # plain JSON values only


def test_stop_does_not_wait_for_a_hanging_attempt(ledger: Ledger) -> None:
    hanging = HangingReceiver()
    notes = Notifications(ledger, replace(FAST, urls=(hanging.url,), timeout_seconds=20.0), poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: hanging.connections, what="the hanging POST")
        started = time.monotonic()
        notes.stop(grace=0.3)
        assert time.monotonic() - started < 1.5
        note = rows(ledger, job_id)[0][0]
        assert note.state == "pending" and note.next_attempt_at > note.created_at + timedelta(seconds=20)  # leased
    finally:
        hanging.close()


def test_wanbox_show_lists_the_notifications(tmp_path: Path) -> None:
    receiver = Receiver().start()
    (tmp_path / "state").mkdir()
    with Ledger.open(tmp_path / "state" / "wanbox.db") as ledger:
        notes = Notifications(ledger, replace(FAST, urls=(receiver.url,)), poll_seconds=0.05)
        notes.start()
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload)
        wait_for(lambda: rows(ledger, job_id)[0][0].state == "delivered", what="the delivery")
        notes.stop()
    receiver.stop()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("WANBOX_ROOT", None)
    show = subprocess.run([sys.executable, "-m", "daemon.cli", "show", job_id, "--root", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    text = show.stdout
    assert "  notifications:\n" in text
    assert f"    notified (rejected, server) http://127.0.0.1:{receiver.port}/hooks/wanbox?…: HTTP 200\n" in text


def test_a_jobs_malformed_url_fails_at_once_with_the_reason(ledger: Ledger) -> None:
    notes = Notifications(ledger, FAST, poll_seconds=0.05)
    notes.start()
    try:
        job_id, payload = rejected_job(ledger)
        notes.job_ended(job_id, "rejected", payload, JobTargets(urls=("file:///etc/passwd",)))
        wait_for(lambda: rows(ledger, job_id)[0][0].state != "pending", what="the refusal")
    finally:
        notes.stop()
    note, tries = rows(ledger, job_id)[0]
    assert note.state == "failed" and len(tries) == 1 and note.last_result.startswith("not sent: expected an http")


def test_post_never_opens_anything_but_http(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not send me")
    outcome = webhooks.post(secret.as_uri(), b"{}", {}, 2.0)
    assert not outcome.ok and outcome.detail.startswith("not an http(s) URL") and "do not send" not in outcome.detail
