"""Notifications from a running daemon: a real `wanbox serve` (fake pool worker) tells the server's webhook and
the job's own ([notify] in the manifest) when a job is done, and when one is rejected, signed with the secret.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.webhooks import verify
from tests.notify_receiver import Receiver
from tests.workers.harness import Root, manifest_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def wait_for(predicate, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert predicate()


def test_a_running_daemon_tells_the_servers_and_the_jobs_webhooks(tmp_path: Path) -> None:
    server, own = Receiver().start(), Receiver().start()
    r = Root(tmp_path, notify={"urls": [server.url], "secret": "s3cret", "retry_base_seconds": 0.2})
    try:
        r.serve()
        r.drop("cat", manifest_text(extra=f'[notify]\nurls = ["{own.url}"]\nevents = ["done"]\n'))
        r.drop("broken", manifest_text(frames=6))
        wait_for(lambda: r.state("cat") == "done" and r.state("broken") == "rejected")
        wait_for(lambda: len(server.received) == 2 and len(own.received) == 1)
        by_state = {m.document["job"]["state"]: m for m in server.received}
        done = by_state["done"]
        assert verify(done.body, "s3cret", done.headers["X-Wanbox-Signature"])
        assert done.document["job"]["name"] == "cat" and done.document["job"]["outputs"]["video"].endswith("cat.mp4")
        assert "video.frames = 6" in by_state["rejected"].document["job"]["error"]
        assert own.received[0].document["job"]["job_id"] == r.job("cat").id  # the manifest's own URL, once
        shown = r.cli("show", "cat")
        assert "notifications:" in shown.stdout and "HTTP 200" in shown.stdout
    finally:
        if r.proc is not None:
            r.stop()
        server.stop()
        own.stop()
        r.cleanup()
