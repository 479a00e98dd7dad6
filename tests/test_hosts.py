"""Several hosts, one queue: real `wanbox serve` supervisors (separate processes, separate host ids, each with its
own pool) on one shared root and one real PostgreSQL ledger (tests/pg.py). In (a) and (b) each pool is the real
pipeline.worker under torchrun on tiny models on the CPU; the others, about the ledger's timing (a freeze at an
exact point, a database outage, drain, the per-host lock), use the fake pool worker with its knobs.

(a) 60 jobs dropped at once are each delivered exactly once; (b) a supervisor SIGKILLed mid-sampling: its job
completes on another host once the lease ran out; (c) a supervisor frozen (SIGSTOP) right before delivery, past its
lease, then resumed, delivers no second copy; (d) an upload seen by two hosts is ingested by exactly one (a
rejection too); (e) the database stopped and started under load loses and doubles nothing.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.ledger.claims import IngestClaim
from daemon.states import JobState
from pipeline.video import probe
from tests import pg
from tests.workers.harness import real_pool, wait_for, write_tiny_checkpoint
from tests.workers.hosts import LEASE_SECONDS, Hosts, frozen

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]
S = JobState


@pytest.fixture
def database(pg_cluster: pg.Cluster) -> Iterator[str]:
    if not pg_cluster.running:
        pg_cluster.start()
    url = pg_cluster.create_database()
    yield url
    if not pg_cluster.running:
        pg_cluster.start()
    pg_cluster.drop_database(url)


@pytest.fixture
def three(tmp_path: Path, database: str) -> Iterator[Hosts]:
    hosts = Hosts(tmp_path, database, 3)
    yield hosts
    hosts.cleanup()


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-i2v", "i2v")


def tiny_hosts(tmp_path: Path, database: str, tiny_i2v: Path, n: int) -> Hosts:
    """`n` hosts whose pools run the real worker (one rank, gloo) on one tiny I2V checkpoint they all read."""
    return Hosts(tmp_path, database, n, pool=real_pool("i2v-A14B", tiny_i2v, 1, max_area=4096),
                 jobs={"checkpoint_every_steps": 1, "checkpoint_every_seconds": 0})


@pytest.fixture
def three_tiny(tmp_path: Path, database: str, tiny_i2v: Path) -> Iterator[Hosts]:
    hosts = tiny_hosts(tmp_path, database, tiny_i2v, 3)
    yield hosts
    hosts.cleanup()


def assert_delivered_once(hosts: Hosts, names: list[str]) -> None:
    """Every job done, its mp4, poster and sidecar in the outbox under its own name; no `-2` copy, nothing else."""
    jobs = hosts.jobs()
    assert sorted(j.name for j in jobs) == sorted(names)
    assert {j.state for j in jobs} == {S.DONE}
    expected = sorted(f"{n}{suffix}" for n in names for suffix in (".jpg", ".json", ".mp4"))
    assert hosts.outbox_names() == expected
    assert hosts.sidecar_jobs() == sorted(j.id for j in jobs)  # each sidecar names its own job, once
    assert hosts.ledger.audit() == []
    for job in jobs:
        assert [e.to_state for e in hosts.ledger.events(job.id)].count(S.DONE) == 1
        assert job.outputs_json["video"] == str(hosts.outbox / f"{job.name}.mp4")


def test_sixty_jobs_dropped_at_once_on_three_hosts_are_each_delivered_exactly_once(three_tiny: Hosts) -> None:
    """(a) real tiny models: every delivered file is a decodable video of the job's frames"""
    three = three_tiny
    for i in range(3):
        three.start(i)
    three.wait_serving(0, 1, 2)
    names = [f"clip{n:02d}" for n in range(60)]
    for name in names:
        three.drop(name)
    three.wait_done(60, timeout=480)
    assert_delivered_once(three, names)
    for name in names:
        assert probe(three.outbox / f"{name}.mp4")[0] == 5, name
    ran = Counter(j.holder for j in three.jobs())
    assert len(ran) >= 2, ran  # the queue was shared (a single host doing all 60 would prove nothing)
    with three.ledger._reading() as session:  # one ingest claim per upload, by the host that staged it
        claims = {c.job_id: c.host_id for c in session.query(IngestClaim)}
    assert len(claims) == 60
    for job in three.jobs():
        assert three.ledger.events(job.id)[0].host == claims[job.id]
    status = three.roots[0].cli("status")
    assert status.returncode == 0
    for i in range(3):  # every host's line: its state, warm model and last heartbeat
        assert re.search(rf"host-{i} +serving; pool idle i2v-A14B .*heartbeat \d+s ago", status.stdout), status.stdout
    three.stop_all()


def test_a_host_killed_mid_sampling_loses_its_job_to_another_after_the_lease(three_tiny: Hosts) -> None:
    """(b) real tiny models, a step checkpoint after every step on the shared work/: the host that takes the job
    over resumes it where the dead one left off"""
    three = three_tiny
    for i in range(3):
        three.start(i)
    three.wait_serving(0, 1, 2)
    three.drop("slow", steps=100, frames=81)  # long enough (seconds) that the kill lands mid-sampling
    # the denoising phase's step 2 (the state is SAMPLING from dispatch on: the encode reports steps 1 and 2 of 2 too)
    wait_for(lambda: any(j.state == S.SAMPLING and j.phase == "sampling" and (j.step or 0) >= 2
                         for j in three.jobs()), 120, three.logs)
    victim = three.index(three.jobs()[0].holder)
    three.signal(victim, signal.SIGKILL)  # power gone: the supervisor and its pool
    three.procs[victim].wait()
    three.kill_pool(victim)
    [job] = three.wait_done(1, timeout=240 + 3 * LEASE_SECONDS)
    assert probe(three.outbox / "slow.mp4")[0] == 81
    resumed = json.loads((three.outbox / "slow.json").read_text())["resumed_from"]
    assert resumed is not None and 2 <= resumed["step"] < 100, (resumed, three.logs())  # not sampled again from the start
    assert_delivered_once(three, ["slow"])
    events = three.ledger.events(job.id)
    taken = [e for e in events if "taken back from host" in e.message]
    assert len(taken) == 1 and f"from host host-{victim} by" in taken[0].message
    assert job.holder != f"host-{victim}" and job.attempts_made == 2
    shown = three.roots[(victim + 1) % 3].cli("show", job.id)
    assert f"runs:     1 host-{victim}, 2 {job.holder}" in shown.stdout, shown.stdout
    status = three.roots[(victim + 1) % 3].cli("status").stdout
    assert re.search(rf"host-{victim} +GONE", status), status
    three.stop_all()


def test_a_host_frozen_past_its_lease_delivers_no_second_copy(three_tiny: Hosts) -> None:
    """(c) frozen at the exact point before delivery (WANBOX_FREEZE_AT), so that the others take the job first."""
    three = three_tiny
    first = three.start(0, WANBOX_FREEZE_AT="finalize.begin")
    three.wait_serving(0)
    three.drop("frozen")
    wait_for(lambda: frozen(first), 60, three.logs)
    three.start(1)
    three.start(2)
    [job] = three.wait_done(1, timeout=60 + 3 * LEASE_SECONDS)
    assert job.holder in ("host-1", "host-2")
    first.send_signal(signal.SIGCONT)  # host-0 wakes up with the worker's finished video in hand
    wait_for(lambda: "not delivered here: lease lost" in three.roots[0].log_text(), 30, three.logs)
    three.drop("after")  # and it goes on serving
    three.wait_done(2, timeout=60)
    assert_delivered_once(three, ["frozen", "after"])
    events = three.ledger.events(job.id)
    assert [e.host for e in events if e.to_state == S.DONE] == [job.holder]
    assert first.poll() is None
    three.stop_all()


def test_an_upload_seen_by_two_hosts_is_ingested_by_exactly_one(tmp_path: Path, database: str,
                                                                  tiny_i2v: Path) -> None:
    """(d) both watch the inbox from the start; a rejected upload is claimed the same way (one failed/ folder)."""
    hosts = tiny_hosts(tmp_path, database, tiny_i2v, 2)
    try:
        hosts.start(0)
        hosts.start(1)
        hosts.wait_serving(0, 1)
        names = [f"up{n}" for n in range(6)]
        for name in names:
            hosts.drop(name)
        (hosts.inbox / "broken.toml").write_text('schema = 1\nkind = "i2v"\nprompt = 5\n')
        wait_for(lambda: len(hosts.jobs()) == 7 and all(j.state in (S.DONE, S.REJECTED) for j in hosts.jobs()), 120,
                 hosts.logs)  # fmt: skip
        assert Counter(j.state for j in hosts.jobs()) == {S.DONE: 6, S.REJECTED: 1}
        assert_delivered_once_subset(hosts, names)
        assert sorted(p.name for p in (hosts.shared / "failed").iterdir()) == ["broken"]
        assert (hosts.shared / "failed" / "broken" / "error.txt").is_file()
        stagers = Counter(hosts.ledger.events(j.id)[0].host for j in hosts.jobs())
        assert sum(stagers.values()) == 7
        hosts.stop_all()
    finally:
        hosts.cleanup()


def assert_delivered_once_subset(hosts: Hosts, names: list[str]) -> None:
    done = [j for j in hosts.jobs() if j.state == S.DONE]
    assert sorted(j.name for j in done) == sorted(names)
    assert hosts.outbox_names() == sorted(f"{n}{s}" for n in names for s in (".jpg", ".json", ".mp4"))
    assert hosts.sidecar_jobs() == sorted(j.id for j in done)


def test_the_database_restarted_under_load_loses_and_doubles_nothing(three_tiny: Hosts,
                                                                      pg_cluster: pg.Cluster) -> None:
    """(e) stopped like a crash (immediate) while jobs run on all hosts, started again: every job ends delivered
    exactly once, each supervisor still serving."""
    three = three_tiny
    for i in range(3):
        three.start(i)
    three.wait_serving(0, 1, 2)
    names = [f"load{n:02d}" for n in range(24)]
    for name in names:
        three.drop(name, steps=30, frames=21)  # a second or so each: the outage lands with jobs in flight

    def busy() -> bool:
        jobs = three.jobs()
        done = sum(j.state == S.DONE for j in jobs)
        return len(jobs) == 24 and done >= 3 and any(j.state in (S.SAMPLING, S.PREPROCESSING) for j in jobs)

    wait_for(busy, 180, three.logs)
    pg_cluster.stop("immediate")
    time.sleep(1.5 * LEASE_SECONDS)  # down longer than a lease: every lease has run out when it comes back
    pg_cluster.start()
    three.wait_done(24, timeout=300)
    assert_delivered_once(three, names)
    assert all(proc.poll() is None for proc in three.procs.values())
    three.stop_all()


def test_a_drained_host_takes_no_new_jobs_and_says_so(tmp_path: Path, database: str) -> None:
    """`wanbox drain --host ID`: that host idles as drained (in `wanbox status`), the others take the queue;
    `--undo` gives it work again."""
    hosts = Hosts(tmp_path, database, 2)
    try:
        hosts.start(0)
        hosts.start(1)
        hosts.wait_serving(0, 1)
        asked = hosts.roots[1].cli("drain", "--host", "host-0")
        assert asked.returncode == 0 and "host host-0: drain requested" in asked.stdout
        wait_for(lambda: {h.host_id: h.state for h in hosts.hosts_rows()}["host-0"] == "drained", 30, hosts.logs)
        for name in ("d1", "d2", "d3"):
            hosts.drop(name)
        jobs = hosts.wait_done(3, timeout=60)
        assert {j.holder for j in jobs} == {"host-1"}
        assert re.search(r"host-0 +drained; pool", hosts.roots[0].cli("status").stdout)
        unknown = hosts.roots[0].cli("drain", "--host", "nobody")
        assert unknown.returncode == 3 and "known hosts: host-" in unknown.stderr
        assert hosts.roots[0].cli("drain", "--host", "host-0", "--undo").returncode == 0
        hosts.wait_serving(0, 1)
        hosts.stop_all()
    finally:
        hosts.cleanup()


def test_hosts_share_a_root_but_one_host_id_serves_it_once(tmp_path: Path, database: str) -> None:
    """The root lock is per host (state/serve.<host id>.lock): host-0 and host-1 both serve the shared root, a
    second supervisor as host-0 is refused, saying why."""
    hosts = Hosts(tmp_path, database, 2)
    try:
        hosts.start(0)
        hosts.start(1)
        hosts.wait_serving(0, 1)
        first = hosts.procs[0]
        twin = hosts.start(0)  # the same host id again
        hosts.procs[0] = first
        assert twin.wait(60) == 1
        assert "another `wanbox serve`" in hosts.roots[0].log_text() and "as host host-0" in hosts.roots[0].log_text()
        assert sorted(p.name for p in (hosts.shared / "state").glob("serve.*.lock")) == [
            "serve.host-0.lock", "serve.host-1.lock"]
        assert first.poll() is None
        hosts.stop_all()
    finally:
        hosts.cleanup()
