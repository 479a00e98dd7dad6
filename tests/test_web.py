"""The status page's server in-process: real HTTP on a free port, a real SQLite ledger, real outbox files.

The JSON API's shape, the files confined to the outbox, the token for cancel/retry, the Host check and
/metrics. A running daemon and a real browser are in test_web_browser.py and test_metrics.py.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import Config, parse_config
from daemon.heartbeat import Heartbeat
from daemon.ledger import Ledger
from daemon.pool import WarmPool
from daemon.states import JobState, shortest_path
from daemon.web import WebServer

S = JobState


@dataclass
class Site:
    cfg: Config
    ledger: Ledger
    url: str
    jobs: dict[str, str]

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        """The exact path on the wire (no client-side normalisation of '..')."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            reply = conn.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            conn.close()

    def json(self, path: str, method: str = "GET", **headers: str) -> tuple[int, Any]:
        status, _, body = self.request(method, path, headers)
        return status, json.loads(body)


def drive(ledger: Ledger, name: str, to: JobState, priority: int = 0, **fields: Any) -> str:
    job = ledger.add_staged(name, "i2v", f"inbox/{name}.toml", None, model_id="i2v-A14B", priority=priority)
    current = S.STAGED
    path = shortest_path(S.STAGED, to)
    for nxt in path:
        ledger.transition(job.id, current, nxt, f"to {nxt}", **(fields if nxt == to else {}))
        current = nxt
    return job.id


def make_site(tmp_path: Path, token: str) -> tuple[Config, Ledger, dict[str, str]]:
    cfg = parse_config({"paths": {"root": str(tmp_path / "root")},
                        "web": {"enabled": True, "port": 0, "token": token}})  # fmt: skip
    for folder in cfg.all_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(cfg.paths.ledger)
    outbox = cfg.paths.outbox
    Image.new("RGB", (40, 30), (200, 40, 40)).save(outbox / "cat.jpg")
    (outbox / "cat.json").write_text('{"job_id": "x"}')
    (outbox / "cat.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    outputs = {"video": str(outbox / "cat.mp4"), "poster": str(outbox / "cat.jpg"), "sidecar": str(outbox / "cat.json")}
    jobs = {
        "cat": drive(ledger, "cat", S.DONE, outputs_json=outputs, gpu_seconds=12.5,
                     timings_json={"preprocess": 0.4, "sampling": 8.0}),
        "low": drive(ledger, "low", S.READY, priority=0),
        "high": drive(ledger, "high", S.QUEUED, priority=5),
        "upload": drive(ledger, "upload", S.STAGED),
        "busy": drive(ledger, "busy", S.SAMPLING),
        "broken": drive(ledger, "broken", S.FAILED, last_error="injected oom error", error_kind="oom"),
    }
    ledger.record_progress(jobs["busy"], "sampling", 3, 12)
    return cfg, ledger, jobs


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from _serve(tmp_path, token="s3cret")


def _serve(tmp_path: Path, token: str) -> Iterator[Site]:
    cfg, ledger, jobs = make_site(tmp_path, token)
    heartbeat = Heartbeat(cfg.paths.root, "0.1.0")
    heartbeat.start(ledger.engine)
    heartbeat.beat(WarmPool(cfg.pool, tmp_path / "pool.sock"), None)  # a real, never launched pool
    server = WebServer(cfg, heartbeat.host_id)
    url = server.start()
    assert url is not None and url.startswith("http://127.0.0.1:")
    try:
        yield Site(cfg, ledger, url, jobs)
    finally:
        server.stop()
        ledger.close()


def test_api_status_has_the_queue_progress_outputs_failures_and_the_daemon(site: Site) -> None:
    code, status = site.json("/api/status")
    assert code == 200 and status["controls"] is True
    assert status["daemon"]["alive"] is True and status["daemon"]["pool"]["state"] == "stopped"
    assert status["counts"]["done"] == 1 and status["counts"]["sampling"] == 1
    queue = {j["name"]: j for j in status["queue"]}
    assert [j["name"] for j in status["queue"]] == ["high", "low", "upload"]  # priority first, staged last
    assert (queue["high"]["queue_position"], queue["low"]["queue_position"], queue["upload"]["queue_position"]) == (1, 2, None)
    [busy] = status["running"]
    assert busy["progress"] == {**busy["progress"], "phase": "sampling", "step": 3, "total": 12, "fraction": 0.25}
    assert busy["stale"] is False and "eta_seconds" in busy and busy["job_eta_seconds"] is None
    [cat] = status["recent"]
    assert cat["files"] == {"video": "/files/cat.mp4", "poster": "/files/cat.jpg", "sidecar": "/files/cat.json"}
    assert cat["gpu_seconds"] == 12.5
    [broken] = status["failures"]
    assert broken["error"] == "injected oom error" and broken["error_kind"] == "oom"


def test_the_page_and_a_jobs_detail(site: Site) -> None:
    code, headers, body = site.request("GET", "/")
    assert code == 200 and b'src="/app.js"' in body and "default-src 'self'" in headers["Content-Security-Policy"]
    assert site.request("GET", "/app.js")[0] == 200 and site.request("GET", "/style.css")[0] == 200
    code, detail = site.json(f"/api/jobs/{site.jobs['cat']}")
    assert code == 200 and detail["name"] == "cat" and [e["to"] for e in detail["events"]][-1] == "done"
    assert detail["daemon_events"] == []  # it ended before this daemon started
    code, busy = site.json(f"/api/jobs/{site.jobs['busy'][:-1]}")  # a unique prefix is enough
    assert code == 200 and busy["daemon_events"][0]["message"].startswith("daemon started")
    code, missing = site.json("/api/jobs/nosuchjob")
    assert code == 404 and "no job with id" in missing["error"]
    assert site.request("GET", "/nothing-here")[0] == 404


def test_outbox_files_are_served_and_nothing_outside_it(site: Site, tmp_path: Path) -> None:
    outbox = site.cfg.paths.outbox
    code, headers, body = site.request("GET", "/files/cat.jpg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and body == (outbox / "cat.jpg").read_bytes()
    assert site.request("GET", "/files/cat.mp4")[1]["Content-Type"] == "video/mp4"
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    os.symlink(secret, outbox / "link.jpg")
    (outbox / ".partial.mp4").write_text("x")
    (outbox / "folder").mkdir()
    for path in ("/files/../state/wanbox.db", "/files/..%2Fstate%2Fwanbox.db", "/files/%2e%2e/state/wanbox.db",
                 "/files/link.jpg", "/files/.partial.mp4", "/files/folder", "/files/", f"/files/{secret}",
                 "/files/%00cat.jpg", "/files/nope.jpg"):
        code, _, body = site.request("GET", path)
        assert code == 404 and b"do not serve" not in body and b"SQLite" not in body, path


def test_cancel_and_retry_need_the_token_as_a_header(site: Site) -> None:
    busy, broken, cat = site.jobs["busy"], site.jobs["broken"], site.jobs["cat"]
    code, reply = site.json(f"/api/jobs/{busy}/cancel", "POST")
    assert code == 401 and "Authorization: Bearer" in reply["error"]
    assert site.json(f"/api/jobs/{busy}/cancel", "POST", Authorization="Bearer wrong")[0] == 401
    assert site.ledger.get(busy).state == S.SAMPLING
    code, reply = site.json(f"/api/jobs/{busy}/cancel", "POST", Authorization="Bearer s3cret")
    assert code == 200 and reply["cancelled_from"] == "sampling" and site.ledger.get(busy).state == S.CANCELLED
    assert site.json("/api/status")[1]["counts"]["cancelled"] == 1  # the snapshot was refreshed at once
    code, reply = site.json(f"/api/jobs/{broken}/retry", "POST", Authorization="Bearer s3cret")
    assert code == 200 and reply["state"] == "queued" and site.ledger.get(broken).state == S.QUEUED
    code, reply = site.json(f"/api/jobs/{cat}/cancel", "POST", Authorization="Bearer s3cret")
    assert code == 409 and "already ended" in reply["error"]
    assert site.request("GET", f"/api/jobs/{busy}/cancel")[0] == 404  # a GET never acts


def test_without_a_token_the_page_is_read_only(tmp_path: Path) -> None:
    for site in _serve(tmp_path, token=""):
        code, reply = site.json(f"/api/jobs/{site.jobs['busy']}/cancel", "POST", Authorization="Bearer ")
        assert code == 403 and "read-only" in reply["error"]
        assert site.ledger.get(site.jobs["busy"]).state == S.SAMPLING
        assert site.json("/api/status")[1]["controls"] is False


def test_only_requests_addressed_to_loopback_are_answered(site: Site) -> None:
    code, reply = site.json("/api/status", Host="wanbox.attacker.example")
    assert code == 421 and "127.0.0.1" in reply["error"]
    assert site.request("GET", "/api/status", {"Host": "localhost:8790"})[0] == 200


def test_the_snapshot_is_cached_for_about_a_second(site: Site) -> None:
    first = site.json("/api/status")[1]["generated_at"]
    assert site.json("/api/status")[1]["generated_at"] == first


def test_metrics_come_from_the_ledger(site: Site) -> None:
    code, headers, body = site.request("GET", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert samples[("wanbox_jobs", (("state", "done"),))] == 1
    assert samples[("wanbox_queue_depth", ())] == 2  # queued + ready
    assert samples[("wanbox_failed_jobs", (("error_kind", "oom"),))] == 1
    assert samples[("wanbox_phase_duration_seconds_count", (("phase", "sampling"),))] == 1
    assert samples[("wanbox_phase_duration_seconds_bucket", (("le", "5.0"), ("phase", "sampling")))] == 0
    assert samples[("wanbox_phase_duration_seconds_bucket", (("le", "10.0"), ("phase", "sampling")))] == 1
    assert samples[("wanbox_job_gpu_seconds_sum", ())] == 12.5
    assert samples[("wanbox_inbox_outage", ())] == 0
    assert samples[("wanbox_pool_state", (("model", ""), ("state", "stopped")))] == 1
