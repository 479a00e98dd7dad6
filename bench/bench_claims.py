"""Claim throughput and latency of one shared ledger under K supervisors (issue 14: the limit of the design).

A throwaway PostgreSQL cluster (tests/pg.py's) and, for comparison, one SQLite file. For each K in `--claimers`, a
fresh database migrated by `Ledger.open`, N ready jobs seeded in bulk through the ledger's ORM models (with the
events intake and preparation write, so `Ledger.audit` holds), then K claimer processes (spawn) started together.
Each loops on the pool driver's scheduling call (`Ledger.claim_next(READY, SAMPLING, ...)` with the arguments
daemon/pool_driver.py passes) and takes every job it gets through the transitions a real job makes to `done`
(sampling -> finalizing with gpu_seconds, finalizing -> done with outputs_json), timing each call. No sampling
happens in between: this is the ledger's ceiling, not a workload.

Checks: every job claimed exactly once (by the claimers' own lists and by the ledger's events), none left ready,
all done, the audit clean. Prints one JSON line (the last line) after a markdown table.

    python3 bench/bench_claims.py --jobs 2000 --claimers 1,3,10 --out bench/results/2026-12-04/claims.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from daemon.ledger import Event, JobRecord, Ledger, new_job_id  # noqa: E402
from daemon.states import JobState as S  # noqa: E402
from tests import pg  # noqa: E402

MODEL = "i2v-A14B"
SEED_PATH = [S.STAGED, S.QUEUED, S.PREPROCESSING, S.READY]  # the events a ready job has behind it
MAX_SWITCH_WAIT = timedelta(seconds=1800)  # config's pool.max_switch_wait_seconds default


# ---- one claimer (a supervisor's pool driver, minus the pool) ---------------------------------------------


LEASE_SECONDS = 60.0  # the supervisor's default ([jobs] lease_seconds)


def claim(ledger: Ledger, loaded_since: datetime, jobs_run: int) -> JobRecord | None:
    """The pool driver's claim (PoolDriver.dispatch/_run for an idle pool of MODEL): the one place to adapt when
    claim_next's arguments change (e.g. a holder id and a lease)."""
    turn = {"model_id": MODEL, "now": datetime.now(timezone.utc), "max_wait": MAX_SWITCH_WAIT,
            "loaded_since": loaded_since, "fresh": jobs_run == 0}  # fmt: skip
    return ledger.claim_next(S.READY, S.SAMPLING, **turn, if_model=MODEL, message=f"sent to the {MODEL} pool")


def finish(ledger: Ledger, job_id: str) -> None:
    """What a job's end costs the ledger: the worker's done, then the delivery (as pool_driver and delivery do)."""
    assert ledger.transition(job_id, S.SAMPLING, S.FINALIZING, "the worker reported done", gpu_seconds=0.0)
    assert ledger.transition(job_id, S.FINALIZING, S.DONE, f"delivered outbox/{job_id}.mp4",
                             outputs_json={"video": f"outbox/{job_id}.mp4"})  # fmt: skip


def claimer(url: str, host: str, ready: Any, go: Any, results: Any) -> None:
    """One process, as one host: open the ledger (warm connection) holding leases as the supervisor does, wait for
    the start, claim and finish (fenced writes) until none is left."""
    ledger = Ledger.open(url).hold_as(host, LEASE_SECONDS)
    loaded_since = datetime.now(timezone.utc)
    ledger.peek_next(S.READY)  # the first connection is made before the clock starts
    ready.put(True)
    go.wait()
    taken: list[tuple[str, float, float]] = []  # (job id, claim seconds, finish seconds)
    while True:
        began = time.monotonic()
        record = claim(ledger, loaded_since, len(taken))
        claimed = time.monotonic()
        if record is None:
            break
        finish(ledger, record.id)
        taken.append((record.id, claimed - began, time.monotonic() - claimed))
    ledger.close()
    results.put({"taken": taken, "ended": claimed})


# ---- the database and its jobs ------------------------------------------------------------------------------


def seed(ledger: Ledger, jobs: int) -> set[str]:
    """`jobs` ready jobs of MODEL, inserted in one transaction with their events; returns their ids."""
    start = datetime.now(timezone.utc) - timedelta(seconds=jobs + 60)
    ids: set[str] = set()
    with Session(ledger.engine) as session, session.begin():
        for i in range(jobs):
            at = start + timedelta(seconds=i)  # one second apart: distinct ids, the oldest first in the queue
            job = JobRecord(id=new_job_id(at), name=f"job{i}", kind="i2v", model_id=MODEL, state=S.READY, priority=0,
                            manifest_path=f"inbox/job{i}.toml", attempts=0, max_attempts=3, created_at=at,
                            updated_at=at, work_dir=f"work/job{i}")  # fmt: skip
            session.add(job)
            ids.add(job.id)
        session.flush()  # the job rows before their events (the foreign key)
        for job_id in ids:
            session.add_all(Event(job_id=job_id, at=start, from_state=frm, to_state=to, message="seeded")
                            for frm, to in zip([None, *SEED_PATH[:-1]], SEED_PATH, strict=True))  # fmt: skip
    return ids


def claims_per_job(ledger: Ledger) -> Counter[str]:
    """How many times the ledger's events say each job was taken by a pool (ready -> sampling)."""
    stmt = (select(Event.job_id, func.count()).where(Event.from_state == S.READY, Event.to_state == S.SAMPLING)
            .group_by(Event.job_id))  # fmt: skip
    with Session(ledger.engine) as session:
        return Counter(dict(session.execute(stmt).all()))


# ---- one run: K claimers on a fresh database ---------------------------------------------------------------


def run(url: str, jobs: int, claimers: int) -> dict[str, Any]:
    with Ledger.open(url) as ledger:
        ids = seed(ledger, jobs)
    load = os.getloadavg()[0]  # the machine is shared: how busy it was already when this run began
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=claimer, args=(url, f"host-{i}", ready, go, results)) for i in range(claimers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    began = time.monotonic()
    go.set()
    outs = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    wall = max(out["ended"] for out in outs) - began
    taken = [t for out in outs for t in out["taken"]]
    with Ledger.open(url) as ledger:
        checks = check(ledger, ids, [t[0] for t in taken], [proc.exitcode for proc in procs])
    claim_s, finish_s = [t[1] for t in taken], [t[2] for t in taken]
    return {"claimers": claimers, "jobs": jobs, "wall_s": round(wall, 3), "claims_per_s": round(len(taken) / wall, 1),
            "per_claimer": sorted(len(out["taken"]) for out in outs), "claim_ms": latency(claim_s),
            "finish_ms": latency(finish_s), "load_1min_before": round(load, 2), "checks": checks}  # fmt: skip


def check(ledger: Ledger, ids: set[str], taken: list[str], exitcodes: list[int | None]) -> dict[str, Any]:
    by_claimers, by_events = Counter(taken), claims_per_job(ledger)
    counts = ledger.counts_by_state()
    result = {
        "claimed_exactly_once": set(by_claimers) == ids and set(by_claimers.values()) == {1},
        "events_one_claim_each": set(by_events) == ids and set(by_events.values()) == {1},
        "none_left_ready": counts[S.READY] == 0 and counts[S.SAMPLING] == 0 and counts[S.FINALIZING] == 0,
        "all_done": counts[S.DONE] == len(ids),
        "audit_clean": ledger.audit() == [],
        "claimers_exited_0": exitcodes == [0] * len(exitcodes),
    }
    return {**result, "ok": all(result.values())}


def latency(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]  # nearest rank
    return {"p50": round(statistics.median(ordered) * 1000, 2), "p99": round(p99 * 1000, 2),
            "max": round(ordered[-1] * 1000, 2), "mean": round(statistics.fmean(ordered) * 1000, 2)}  # fmt: skip


@contextmanager
def databases(backend: str) -> Iterator[tuple[Any, str]]:
    """Yields (a maker of fresh empty database URLs, the server's version) for "postgresql" or "sqlite"."""
    if backend == "postgresql":
        why = pg.unavailable()
        if why is not None:
            raise SystemExit(f"cannot start PostgreSQL: {why}")
        cluster = pg.start_cluster()
        try:
            yield cluster.create_database, cluster.version()
        finally:
            cluster.destroy()
        return
    import sqlite3

    with tempfile.TemporaryDirectory(prefix="wanbox-bench-") as folder:
        made = iter(range(1000))
        yield (lambda: f"sqlite:///{folder}/ledger{next(made)}.db"), f"SQLite {sqlite3.sqlite_version} (WAL, FULL)"


# ---- the report ----------------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    lines = ["| backend | claimers | jobs | wall s | claims/s | claim p50 / p99 / max ms | finish p50 / p99 ms | "
             "per claimer | checks |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for backend in report["backends"]:
        for r in backend["runs"]:
            c, f = r["claim_ms"], r["finish_ms"]
            lines.append(f"| {backend['server']} | {r['claimers']} | {r['jobs']} | {r['wall_s']} | {r['claims_per_s']} "
                         f"| {c['p50']} / {c['p99']} / {c['max']} | {f['p50']} / {f['p99']} | "
                         f"{min(r['per_claimer'])}–{max(r['per_claimer'])} | {'ok' if r['checks']['ok'] else 'FAILED'} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="ready jobs seeded per run")
    parser.add_argument("--claimers", default="1,3,10", help="comma-separated claimer process counts, one run each")
    parser.add_argument("--backends", default="postgresql,sqlite", help="postgresql and/or sqlite")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    try:
        args.claimers = [int(k) for k in args.claimers.split(",")]
    except ValueError:
        parser.error(f"--claimers {args.claimers!r}: expected comma-separated whole numbers such as 1,3,10")
    args.backends = [b.strip() for b in args.backends.split(",")]
    if bad := [b for b in args.backends if b not in ("postgresql", "sqlite")]:
        parser.error(f"--backends: {', '.join(bad)} unknown; expected postgresql and/or sqlite")
    if args.jobs < 1 or min(args.claimers) < 1:
        parser.error(f"--jobs {args.jobs} / --claimers {args.claimers}: expected at least 1 each")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "cpus": mp.cpu_count(), "backends": []}  # fmt: skip
    for backend in args.backends:
        with databases(backend) as (new_url, server):
            runs = [run(new_url(), args.jobs, k) for k in args.claimers]
        report["backends"].append({"backend": backend, "server": server, "runs": runs})
    report["ok"] = all(r["checks"]["ok"] for b in report["backends"] for r in b["runs"])
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
