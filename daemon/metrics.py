"""Prometheus metrics, read from the ledger at scrape time (stateless: they survive restarts and agree
with `wanbox status`), exposed through prometheus-client's own collector and text format.

It must not keep counters in memory nor write anything; every series comes from the jobs, hosts and
daemon_runs tables (the GPUs from the heartbeat's NVML readings in the hosts row).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from daemon.hosts import HostRecords
from daemon.ledger import JobRecord as Job
from daemon.states import JobState

S = JobState
WAITING_FOR_WORK = (S.QUEUED, S.READY)  # accepted and waiting (staged jobs are still uploading)
# Phase and per-job durations range from a second (tiny CPU jobs) to an hour (720p on one GPU).
SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)


def registry_for(ledger: Any, host_id: str) -> CollectorRegistry:
    """A registry with the ledger's metrics and this process's own (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, host_id))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (prometheus-client writes it)."""
    return generate_latest(registry)


class LedgerCollector(Collector):
    """Every wanbox_* series, computed from the ledger when Prometheus scrapes."""

    def __init__(self, ledger: Any, host_id: str) -> None:
        self.ledger = ledger
        self.host_id = host_id
        self.records = HostRecords(ledger.engine)

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(timezone.utc)
        with Session(self.ledger.engine) as session, session.begin():
            yield from self._jobs(session, now)
            yield from self._durations(session)
        yield from self._host(now)

    # ---- jobs -------------------------------------------------------------------------------------

    def _jobs(self, session: Session, now: datetime) -> Iterator[Metric]:
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        jobs = GaugeMetricFamily("wanbox_jobs", "Jobs in the ledger by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("wanbox_queue_depth", "Accepted jobs waiting for preprocessing or the GPU pool",
                                value=sum(counts.get(s, 0) for s in WAITING_FOR_WORK))
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state.in_(WAITING_FOR_WORK)))
        age = (now - _utc(oldest)).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("wanbox_queue_oldest_age_seconds",
                                "Age of the oldest accepted job still waiting (0 when none waits)", value=age)
        failed = GaugeMetricFamily("wanbox_failed_jobs", "Jobs now in the failed state, by error kind",
                                   labels=["error_kind"])
        stmt = select(Job.error_kind, func.count()).where(Job.state == S.FAILED).group_by(Job.error_kind)
        for kind, n in session.execute(stmt).all():
            failed.add_metric([str(kind) if kind else "unknown"], n)
        yield failed

    def _durations(self, session: Session) -> Iterator[Metric]:
        rows = session.execute(select(Job.timings_json, Job.gpu_seconds).where(Job.state == S.DONE)).all()
        phases: dict[str, list[float]] = {}
        for timings, _gpu in rows:
            for phase, seconds in (timings or {}).items():
                if isinstance(seconds, (int, float)):
                    phases.setdefault(phase, []).append(float(seconds))
        histogram = HistogramMetricFamily("wanbox_phase_duration_seconds",
                                          "Time delivered jobs spent in each phase", labels=["phase"])
        for phase, values in sorted(phases.items()):
            histogram.add_metric([phase], _buckets(values), sum(values))
        yield histogram
        gpu = [float(g) for _t, g in rows if g is not None]
        per_job = HistogramMetricFamily("wanbox_job_gpu_seconds", "GPU-seconds (seconds x GPUs) per delivered job")
        per_job.add_metric([], _buckets(gpu), sum(gpu))
        yield per_job

    # ---- this host: daemon, pool, inbox, GPUs -------------------------------------------------------

    def _host(self, now: datetime) -> Iterator[Metric]:
        launches, deaths = self.records.pool_totals(self.host_id)
        yield CounterMetricFamily("wanbox_pool_launches", "Warm pool launches on this host, over every daemon run",
                                  value=launches)
        yield CounterMetricFamily("wanbox_pool_deaths", "Warm pool deaths (crash, hang, failed start) on this host",
                                  value=deaths)
        host = next((h for h in self.records.hosts() if h.host_id == self.host_id), None)
        if host is None:
            return
        yield GaugeMetricFamily("wanbox_heartbeat_age_seconds", "Seconds since the supervisor loop's last heartbeat",
                                value=(now - host.heartbeat_at).total_seconds())
        yield GaugeMetricFamily("wanbox_inbox_outage", "1 while the inbox cannot be read (e.g. an unmounted share)",
                                value=1.0 if host.inbox_outage else 0.0)
        pool = GaugeMetricFamily("wanbox_pool_state", "1 for the warm pool's current state and model",
                                 labels=["state", "model"])
        pool.add_metric([host.pool_state or "stopped", host.pool_model or ""], 1.0)
        yield pool
        yield from _gpu_metrics(host.gpus_json or [])


def _gpu_metrics(gpus: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["gpu", "name", "uuid"]
    util = GaugeMetricFamily("wanbox_gpu_utilization_ratio", "GPU busy time over NVML's last sample period (0-1)",
                             labels=labels)
    used = GaugeMetricFamily("wanbox_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels)
    total = GaugeMetricFamily("wanbox_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=labels)
    for g in gpus:
        key = [str(g["index"]), g["name"], g["uuid"]]
        util.add_metric(key, g["utilization_percent"] / 100.0)
        used.add_metric(key, g["memory_used_bytes"])
        total.add_metric(key, g["memory_total_bytes"])
    yield from (util, used, total)


def _buckets(values: list[float]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs over SECONDS_BUCKETS, ending with +Inf."""
    ordered = sorted(values)
    pairs = [(_le(bound), float(bisect.bisect_right(ordered, bound))) for bound in SECONDS_BUCKETS]
    return [*pairs, ("+Inf", float(len(ordered)))]


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


def _utc(value: datetime) -> datetime:
    # SQLite returns the aggregate as naive UTC text (the column type's conversion is not applied to min()).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
