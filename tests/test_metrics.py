"""Prometheus metrics: scraped from a running daemon after real jobs and parsed with prometheus_client's own
text parser; the per-GPU series from a hosts row; the Grafana dashboard asks only for series that exist.
"""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.hosts import HostRecords
from daemon.ledger import Ledger
from daemon.metrics import SECONDS_BUCKETS, LedgerCollector, _buckets, exposition, registry_for
from tests.workers.harness import Root, manifest_text, wait_for

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "systemd" / "grafana-dashboard.json"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_buckets_are_cumulative_and_end_with_inf() -> None:
    pairs = _buckets([0.5, 3.0, 3.0, 4000.0, 9000.0])
    assert pairs[0] == ("1.0", 1.0) and dict(pairs)["5.0"] == 3.0 and dict(pairs)["7200.0"] == 4.0
    assert pairs[-1] == ("+Inf", 5.0) and len(pairs) == len(SECONDS_BUCKETS) + 1


def test_gpu_series_come_from_the_heartbeats_nvml_readings(tmp_path: Path) -> None:
    gpus = [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1", "utilization_percent": 87,
             "memory_used_bytes": 40 * 2**30, "memory_total_bytes": 141 * 2**30}]  # fmt: skip
    with Ledger.open(tmp_path / "wanbox.db") as ledger:
        records = HostRecords(ledger.engine)
        run = records.begin_run("h1", datetime.now(timezone.utc), hostname="h", root="/r", pid=1, version="v",
                                state="serving", heartbeat_seconds=2.0, gpus_json=gpus)  # fmt: skip
        records.beat("h1", run, datetime.now(timezone.utc), 4, 1, inbox_outage="gone", pool_state="busy")
        got = samples(exposition(registry_for(ledger, "h1")).decode())
        key = (("gpu", "0"), ("name", "NVIDIA H200"), ("uuid", "GPU-1"))
        assert got[("wanbox_gpu_utilization_ratio", key)] == 0.87
        assert got[("wanbox_gpu_memory_used_bytes", key)] == 40 * 2**30
        assert got[("wanbox_gpu_memory_total_bytes", key)] == 141 * 2**30
        assert got[("wanbox_inbox_outage", ())] == 1 and got[("wanbox_pool_deaths_total", ())] == 1
        assert got[("wanbox_pool_launches_total", ())] == 4
        other = samples(exposition(registry_for(ledger, "another-host")).decode())
        assert not any(name.startswith("wanbox_gpu_") for name, _ in other)  # only this host's GPUs


def test_the_grafana_dashboard_asks_only_for_series_that_exist(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "wanbox.db") as ledger:
        families = {m.name for m in LedgerCollector(ledger, "h").collect()}
    names = {"wanbox_" + n for n in ("gpu_utilization_ratio", "gpu_memory_used_bytes", "gpu_memory_total_bytes",
                                     "heartbeat_age_seconds", "inbox_outage", "pool_state")}  # this host's, once it beats
    exposed = set()
    for name in families | names:
        exposed |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"\bwanbox_[a-z_]+", e)}
    assert used and used <= exposed, used - exposed


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_running_daemon_exposes_metrics_after_its_jobs_and_keeps_them_over_a_restart(tmp_path: Path) -> None:
    r = Root(tmp_path, web={"enabled": True, "port": 0})
    r.knobs({"crash": {"exit_at_step": 1}})
    try:
        r.serve()
        r.drop("cat", manifest_text())
        cat = r.wait_state("cat", "done")
        r.drop("crash", manifest_text(image='"crash.jpg"', prompt="crash"), image="crash.jpg")
        r.wait_state("crash", "failed", timeout=60)  # 2 attempts, each kills the pool
        # The pool's counters reach the ledger with the next heartbeat (within a second of the news).
        wait_for(lambda: scrape(r)[("wanbox_pool_deaths_total", ())] == 2, 5, "pool deaths never reached 2")
        got = scrape(r)
        assert got[("wanbox_jobs", (("state", "done"),))] == 1 and got[("wanbox_jobs", (("state", "failed"),))] == 1
        assert got[("wanbox_failed_jobs", (("error_kind", "pool"),))] == 1
        assert got[("wanbox_phase_duration_seconds_count", (("phase", "sampling"),))] == 1  # delivered jobs only
        assert got[("wanbox_phase_duration_seconds_sum", (("phase", "preprocess"),))] == pytest.approx(
            cat.timings_json["preprocess"])
        assert got[("wanbox_job_gpu_seconds_count", ())] == 1
        assert got[("wanbox_job_gpu_seconds_sum", ())] == pytest.approx(cat.gpu_seconds)
        assert got[("wanbox_pool_deaths_total", ())] == 2 and got[("wanbox_pool_launches_total", ())] >= 2
        assert got[("wanbox_queue_depth", ())] == 0 and got[("wanbox_queue_oldest_age_seconds", ())] == 0
        assert got[("wanbox_inbox_outage", ())] == 0 and got[("wanbox_heartbeat_age_seconds", ())] < 10
        assert got[("process_resident_memory_bytes", ())] > 0

        assert r.stop() == 0
        r.serve()  # read from the ledger, not kept in memory: a restart keeps every count
        again = scrape(r)
        for key in (("wanbox_jobs", (("state", "done"),)), ("wanbox_pool_deaths_total", ()),
                    ("wanbox_job_gpu_seconds_sum", ()), ("wanbox_phase_duration_seconds_count", (("phase", "sampling"),))):
            assert again[key] == got[key], key
        assert r.stop() == 0
    finally:
        r.cleanup()


def scrape(r: Root) -> dict:
    urls: list[str] = []

    def published() -> bool:
        with r.ledger() as ledger:
            urls[:] = [h.web_url for h in HostRecords(ledger.engine).hosts() if h.pid == r.proc.pid and h.web_url]
        return bool(urls)

    wait_for(published, 20, lambda: f"no web URL from pid {r.proc.pid}\n{r.log_text()[-3000:]}")
    with urllib.request.urlopen(urls[0] + "metrics", timeout=10) as reply:
        return samples(reply.read().decode())
