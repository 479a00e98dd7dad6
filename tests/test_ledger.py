"""The ledger on real databases, SQLite and PostgreSQL (conftest's `backend`): schema and migrations,
connection settings, ids and look-ups, claim order, dedupe, progress, cancel/retry, and two processes
sharing one new database. Tests of SQLite's own files and locking run on SQLite only.
"""

from __future__ import annotations

import io
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

import daemon.hosts  # noqa: F401 - registers the liveness tables on Base.metadata, as the migrations create them
from daemon import deliveries  # noqa: F401 - its tables are part of Base.metadata, as in the migrations
from daemon.ledger import (
    SCHEMA_HEAD,
    AmbiguousJobId,
    Base,
    IllegalTransition,
    JobNotFound,
    Ledger,
    LedgerError,
    alembic_config,
    database_url,
    intents,  # noqa: F401 - the intents table (revision 0005), as the migrations create it
    network_filesystem,
    next_query,
)
from daemon.ledger import store as ledger_module
from daemon.states import JobState, shortest_path

S = JobState
REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger.open(ledger_url) as opened:
        yield opened


def execute(url: str, sql: str) -> None:
    """One statement on the database itself, past the ledger (as a person with a SQL shell would)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


def add(ledger: Ledger, name: str = "cat", state: JobState = S.STAGED, at: datetime = T0, **options) -> str:
    """A job created at `at` and driven to `state` along legal moves (all stamped `at`)."""
    job = ledger.add_staged(name, options.pop("kind", "i2v"), f"inbox/{name}.toml", None, now=at, **options)
    current = S.STAGED
    for nxt in shortest_path(S.STAGED, state):
        assert ledger.transition(job.id, current, nxt, f"to {nxt}", now=at)
        current = nxt
    return job.id


# ---- schema and migrations ----------------------------------------------------------------------


def test_migrations_create_exactly_the_models_schema(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        revision = MigrationContext.configure(conn).get_current_revision()
        tables = set(inspect(conn).get_table_names())
        claim_index = [i for i in inspect(conn).get_indexes("jobs") if i["name"] == "ix_jobs_claim"]
    assert diff == []
    assert revision == SCHEMA_HEAD == "0006"
    assert tables == {"jobs", "events", "hosts", "daemon_runs", "notifications", "notification_attempts", "intents", "ingest_claims",
                      "alembic_version"}
    assert claim_index[0]["column_names"] == ["state", "priority", "created_at", "retry_after"]


def test_the_quick_open_check_knows_the_newest_revision(ledger_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from alembic.script import ScriptDirectory

    from daemon.ledger import SCHEMA_HEAD

    assert {SCHEMA_HEAD} == set(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())
    Ledger.open(ledger_url).close()
    # An up-to-date ledger opens without Alembic at all (the ~0.3 s import every CLI call used to pay).
    monkeypatch.setitem(sys.modules, "alembic", None)
    with Ledger.open(ledger_url) as again:
        assert again.counts_by_state()[S.QUEUED] == 0


def test_the_first_revision_downgrades_cleanly_and_upgrades_again(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    config = alembic_config(ledger_url)
    command.downgrade(config, "base")
    engine = create_engine(ledger_url)
    with engine.connect() as conn:  # tables and their indexes (not the primary keys' own)
        seen = inspect(conn)
        left = {*seen.get_table_names(), *(i["name"] for t in seen.get_table_names() for i in seen.get_indexes(t))}
    engine.dispose()
    assert {name for name in left if not name.startswith("sqlite_autoindex")} == {"alembic_version"}
    with Ledger.open(ledger_url) as again:
        assert again.get(add(again)).name == "cat"


def test_a_first_revision_ledger_with_jobs_upgrades_to_the_liveness_tables(tmp_path: Path) -> None:
    path = tmp_path / "wanbox.db"
    with Ledger.open(path) as ledger:  # the job is written first: today's rows do not fit the first schema
        job_id = add(ledger, state=S.QUEUED)
    config = alembic_config(database_url(path))
    command.downgrade(config, "0001")  # the job's row stays, in the first revision's columns
    with sqlite3.connect(path) as raw:
        assert "hosts" not in {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
    with Ledger.open(path) as upgraded, upgraded.engine.connect() as conn:
        assert upgraded.get(job_id).state == S.QUEUED
        assert {"hosts", "daemon_runs"} <= set(inspect(conn).get_table_names())
        assert MigrationContext.configure(conn).get_current_revision() == SCHEMA_HEAD


def test_opening_an_existing_ledger_again_keeps_everything(backend: str, new_database, tmp_path: Path) -> None:
    path = tmp_path / "state" / "wanbox.db"
    path.parent.mkdir()
    url = database_url(path) if backend == "sqlite" else new_database()
    with Ledger.open(path if backend == "sqlite" else url) as first:
        job_id = add(first, state=S.QUEUED)
    with Ledger.open(url) as second, Ledger.open(str(path) if backend == "sqlite" else url) as third:
        assert second.get(job_id).state == S.QUEUED
        assert [e.to_state for e in third.events(job_id)] == [S.STAGED, S.QUEUED]
        with third.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == SCHEMA_HEAD
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1


def test_a_ledger_from_a_newer_wanbox_is_refused_with_a_reason(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    execute(ledger_url, "UPDATE alembic_version SET version_num = '0999'")
    shown = r"sqlite:///.*wanbox\.db" if ledger_url.startswith("sqlite") else re.escape(ledger_url)
    with pytest.raises(LedgerError, match=f"cannot upgrade the ledger at {shown}.*0999.*newer wanbox"):
        Ledger.open(ledger_url)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])  # SQLite URLs carry no password
def test_a_password_in_the_url_is_never_shown(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    execute(ledger_url, "UPDATE alembic_version SET version_num = '0999'")
    secret = make_url(ledger_url).set(password="s3cret-pw")  # the test cluster trusts local users: any password
    with pytest.raises(LedgerError) as refused:
        Ledger.open(secret.render_as_string(hide_password=False))
    assert "s3cret-pw" not in str(refused.value) and "0999" in str(refused.value)


def test_paths_and_urls_name_the_same_database(tmp_path: Path) -> None:
    path = tmp_path / "wanbox.db"
    assert database_url(path) == f"sqlite:///{path}"
    assert database_url(f"sqlite:///{path}") == f"sqlite:///{path}"
    with Ledger.open(path) as by_path:
        job_id = add(by_path)
    with Ledger.open(f"sqlite:///{path}") as by_url:
        assert by_url.get(job_id).name == "cat"


def test_a_missing_state_folder_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(
        LedgerError, match=f"the ledger's folder {tmp_path / 'nope'} does not exist: create it"
    ):
        Ledger.open(tmp_path / "nope" / "wanbox.db")


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev 0 0
nas:/export/wanbox /srv/wanbox nfs4 rw,relatime,vers=4.2 0 0
//nas/media /srv/wanbox/inbox\\040share cifs rw,relatime 0 0
/dev/nvme0n1p2 /srv/wanbox/state ext4 rw,relatime 0 0
"""


def test_network_filesystems_are_recognised_from_the_mount_table() -> None:
    assert network_filesystem(Path("/srv/wanbox/work/x"), MOUNTS) == "nfs4"
    assert network_filesystem(Path("/srv/wanbox/inbox share/a"), MOUNTS) == "cifs"
    assert network_filesystem(Path("/srv/wanbox/state"), MOUNTS) is None  # a local disk mounted inside
    assert network_filesystem(Path("/srv/wanboxes"), MOUNTS) is None  # a name prefix is not a parent
    assert network_filesystem(Path("/home/me"), MOUNTS) is None


def test_the_schema_and_the_claim_query_are_portable_to_postgresql() -> None:
    out = io.StringIO()
    config = alembic_config("postgresql://wanbox@db.example/wanbox")
    config.output_buffer = out
    command.upgrade(config, "head", sql=True)  # offline: renders the DDL, connects to nothing
    ddl = out.getvalue()
    assert "CREATE TABLE jobs" in ddl and "CREATE TABLE events" in ddl
    assert "retry_after TIMESTAMP WITH TIME ZONE" in ddl and "params_json JSON" in ddl
    assert "state VARCHAR(16) NOT NULL" in ddl and "PRAGMA" not in ddl

    for query in (next_query(S.READY, ["i2v"], T0, model_id="i2v-A14B"),
                  next_query(S.READY, None, T0, model_id="i2v-A14B", max_wait=timedelta(minutes=5), fresh=True)):  # fmt: skip
        on_postgres = str(query.compile(dialect=postgresql.dialect()))
        assert on_postgres.rstrip().endswith("FOR UPDATE SKIP LOCKED")
        assert "FOR UPDATE" not in str(query.compile(dialect=sqlite.dialect()))
    peek = next_query(S.READY, None, T0, model_id="i2v-A14B", lock=False)  # peek_next locks nothing
    assert "FOR UPDATE" not in str(peek.compile(dialect=postgresql.dialect()))


def test_migrations_command_reports_the_schema_up_to_date(backend: str, ledger_url: str) -> None:
    path = make_url(ledger_url).database if backend == "sqlite" else ledger_url  # a file path is enough
    run = [sys.executable, "-m", "daemon.migrations"]
    upgraded = subprocess.run([*run, "upgrade", "--db", str(path)], cwd=REPO, capture_output=True, text=True)
    assert upgraded.returncode == 0, upgraded.stderr
    checked = subprocess.run([*run, "check", "--db", str(path)], cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "No new upgrade operations detected" in checked.stdout


# ---- connection settings ------------------------------------------------------------------------


def test_pragmas_are_set_on_every_connection(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "wanbox.db", busy_timeout_s=2.5) as ledger:
        connections = [ledger.engine.connect() for _ in range(3)]  # several pooled connections at once
        for conn in connections:
            pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in
                      ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")}  # fmt: skip
            assert pragma == {
                "journal_mode": "wal",
                "synchronous": 2,
                "foreign_keys": 1,
                "busy_timeout": 2500,
            }
        for conn in connections:
            conn.close()


def test_foreign_keys_are_enforced(ledger: Ledger, backend: str) -> None:
    refusal = {"sqlite": "FOREIGN KEY constraint failed", "postgresql": "violates foreign key constraint"}[backend]
    with ledger.engine.connect() as conn, pytest.raises(Exception, match=refusal):
        conn.exec_driver_sql(
            "INSERT INTO events (job_id, at, to_state, message) VALUES ('nope', '2026-01-01 00:00:00', 'queued', '')"
        )
        conn.commit()


def test_a_reader_never_blocks_a_write_and_a_held_write_lock_times_out_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "wanbox.db"
    with Ledger.open(path, busy_timeout_s=0.3) as ledger:
        job_id = add(ledger)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        assert reader.execute("SELECT state FROM jobs").fetchone() == ("staged",)
        assert ledger.transition(job_id, S.STAGED, S.QUEUED, "accepted")  # WAL: the open read is no obstacle
        assert reader.execute("SELECT state FROM jobs").fetchone() == ("staged",)  # its snapshot is stable
        reader.execute("COMMIT")

        writer = sqlite3.connect(path, isolation_level=None, timeout=0)
        writer.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="database is locked"):
            ledger.transition(job_id, S.QUEUED, S.PREPROCESSING, "blocked")
        writer.execute("ROLLBACK")
        assert ledger.transition(job_id, S.QUEUED, S.PREPROCESSING, "free again")
        assert ledger.audit() == []
        reader.close()
        writer.close()


# ---- ids, time and look-ups ---------------------------------------------------------------------


def test_new_jobs_get_sortable_typable_ids_and_a_creation_event(ledger: Ledger) -> None:
    ids = [add(ledger, f"job{i}", at=T0 + timedelta(seconds=i // 3)) for i in range(9)]
    assert len(set(ids)) == 9
    for job_id in ids:
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-hjkmnp-tv-z]{4}", job_id), job_id
    assert ids[0].startswith("20261121-120000-") and ids[-1].startswith("20261121-120002-")
    first = ledger.events(ids[0])
    assert [(e.from_state, e.to_state, e.message) for e in first] == [
        (None, S.STAGED, "manifest found in the inbox")
    ]


def test_an_id_clash_draws_a_new_id(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["20261121-120000-aaaa", "20261121-120000-aaaa", "20261121-120000-bbbb"])
    monkeypatch.setattr(ledger_module, "new_job_id", lambda now: next(drawn))
    first = ledger.add_staged("a", "i2v", "inbox/a.toml", None, now=T0)
    second = ledger.add_staged("b", "i2v", "inbox/b.toml", None, now=T0)
    assert (first.id, second.id) == ("20261121-120000-aaaa", "20261121-120000-bbbb")
    assert [ledger.get(first.id).name, ledger.get(second.id).name] == ["a", "b"]
    assert [len(ledger.events(first.id)), len(ledger.events(second.id))] == [1, 1]


def test_add_staged_stores_what_it_is_given(ledger: Ledger) -> None:
    deadline = T0 + timedelta(minutes=10)
    job = ledger.add_staged(
        "surf", "animate", Path("inbox/surf/job.toml"), deadline, model_id="animate-14B", priority=5,
        max_attempts=4, input_hash="h1", params_json={"mode": "replacement"}, now=T0,
    )  # fmt: skip
    stored = ledger.get(job.id)
    assert (stored.name, stored.kind, stored.manifest_path, stored.model_id) == (
        "surf",
        "animate",
        "inbox/surf/job.toml",
        "animate-14B",
    )
    assert (stored.priority, stored.max_attempts, stored.attempts, stored.input_hash) == (5, 4, 0, "h1")
    assert stored.params_json == {"mode": "replacement"}
    assert stored.staged_deadline == deadline and stored.created_at == T0 and stored.updated_at == T0
    with pytest.raises(ValueError, match="max_attempts=0: expected at least 1"):
        ledger.add_staged("bad", "i2v", "inbox/bad.toml", None, max_attempts=0)


def test_times_come_back_as_utc_aware_and_naive_times_are_refused(ledger: Ledger) -> None:
    paris = timezone(timedelta(hours=1))
    job = ledger.add_staged(
        "cat", "i2v", "inbox/cat.toml", datetime(2026, 11, 21, 13, 0, tzinfo=paris), now=T0
    )
    stored = ledger.get(job.id)
    assert stored.created_at.tzinfo == timezone.utc
    assert stored.staged_deadline == T0 and stored.staged_deadline.tzinfo == timezone.utc
    with pytest.raises(Exception, match="naive datetime .* expected a timezone-aware UTC time"):
        ledger.add_staged("cat", "i2v", "inbox/cat.toml", datetime(2026, 11, 21, 13, 0))


def test_get_by_id_or_unique_prefix(ledger: Ledger) -> None:
    a = add(ledger, "a", at=T0)
    b = add(ledger, "b", at=T0 + timedelta(hours=1))
    assert ledger.get(a).name == "a"
    assert ledger.get(f"  {b}  ").name == "b"
    assert ledger.get(b[:-1]).id == b or ledger.get(b[:-2]).id == b
    assert ledger.get("20261121-13").id == b
    with pytest.raises(
        AmbiguousJobId, match=r"'20261121-1' matches several jobs: .*\(a\), .*\(b\); type more"
    ):
        ledger.get("20261121-1")
    with pytest.raises(JobNotFound, match="no job with id or id prefix '2099'"):
        ledger.get("2099")
    with pytest.raises(JobNotFound):
        ledger.get("2026%")  # SQL wildcards are matched literally
    with pytest.raises(JobNotFound):
        ledger.get("")


def test_find_duplicate_prefers_a_delivered_job_and_ignores_rejected_ones(ledger: Ledger) -> None:
    rejected = add(ledger, "r", S.REJECTED, at=T0, input_hash="same")
    assert ledger.find_duplicate("same") is None
    assert ledger.find_duplicate("same", exclude_id=rejected) is None
    done = add(ledger, "d", S.DONE, at=T0 + timedelta(minutes=1), input_hash="same")
    newer = add(ledger, "n", S.QUEUED, at=T0 + timedelta(minutes=2), input_hash="same")
    assert ledger.find_duplicate("same").id == done
    assert ledger.find_duplicate("same", exclude_id=done).id == newer
    assert ledger.find_duplicate("other") is None


def test_find_by_manifest_and_staged_deadlines(ledger: Ledger) -> None:
    early = ledger.add_staged("a", "i2v", "inbox/a.toml", T0 + timedelta(minutes=1), now=T0)
    late = ledger.add_staged("b", "i2v", "inbox/b.toml", T0 + timedelta(minutes=9), now=T0)
    ledger.add_staged("c", "i2v", "inbox/c.toml", None, now=T0)
    assert ledger.find_by_manifest("inbox/a.toml").id == early.id
    assert ledger.find_by_manifest(Path("inbox/b.toml")).id == late.id
    assert ledger.find_by_manifest("inbox/zzz.toml") is None
    assert [j.id for j in ledger.staged_past_deadline(T0 + timedelta(minutes=5))] == [early.id]
    assert ledger.transition(early.id, S.STAGED, S.REJECTED, "deadline passed")
    assert ledger.staged_past_deadline(T0 + timedelta(minutes=5)) == []
    assert ledger.find_by_manifest("inbox/a.toml") is None
    assert ledger.find_by_manifest("inbox/a.toml", states=[S.REJECTED]).id == early.id


def test_list_and_counts(ledger: Ledger) -> None:
    ids = [add(ledger, f"j{i}", state, at=T0 + timedelta(minutes=i))
           for i, state in enumerate([S.QUEUED, S.DONE, S.QUEUED, S.FAILED])]  # fmt: skip
    assert [j.id for j in ledger.list()] == ids[::-1]
    assert [j.id for j in ledger.list(newest_first=False, limit=2)] == ids[:2]
    assert [j.id for j in ledger.list(states=[S.QUEUED])] == [ids[2], ids[0]]
    counts = ledger.counts_by_state()
    assert set(counts) == set(JobState)
    assert (counts[S.QUEUED], counts[S.DONE], counts[S.FAILED], counts[S.SAMPLING]) == (2, 1, 1, 0)


# ---- claiming ----------------------------------------------------------------------------------


def test_claim_takes_highest_priority_then_oldest(ledger: Ledger) -> None:
    old_low = add(ledger, "old-low", S.QUEUED, at=T0)
    new_high = add(ledger, "new-high", S.QUEUED, at=T0 + timedelta(minutes=2), priority=5)
    mid_low = add(ledger, "mid-low", S.QUEUED, at=T0 + timedelta(minutes=1))
    later = T0 + timedelta(hours=1)
    order = [ledger.claim_next(S.QUEUED, S.PREPROCESSING, now=later) for _ in range(4)]
    assert [j.id if j else None for j in order] == [new_high, old_low, mid_low, None]
    claimed = ledger.get(new_high)
    assert claimed.state == S.PREPROCESSING and claimed.updated_at == later
    assert ledger.events(new_high)[-1].message == "taken for preprocessing"


def test_claim_skips_jobs_whose_retry_time_has_not_come(ledger: Ledger) -> None:
    waiting = add(ledger, "waiting", S.READY, at=T0)
    assert ledger.claim_next(S.READY, S.SAMPLING, now=T0) is not None
    assert ledger.record_failure(waiting, S.SAMPLING, "CUDA out of memory", "oom", True, now=T0) == S.READY
    fresh = add(ledger, "fresh", S.READY, at=T0 + timedelta(seconds=1))
    assert ledger.claim_next(S.READY, S.SAMPLING, now=T0 + timedelta(seconds=5)).id == fresh
    assert ledger.claim_next(S.READY, S.SAMPLING, now=T0 + timedelta(seconds=29)) is None
    assert ledger.claim_next(S.READY, S.SAMPLING, now=T0 + timedelta(seconds=30)).id == waiting


def test_claim_prefers_the_loaded_model_but_not_over_priority(ledger: Ledger) -> None:
    other_old = add(ledger, "other-old", S.READY, at=T0, model_id="animate-14B")
    mine_new = add(ledger, "mine-new", S.READY, at=T0 + timedelta(minutes=1), model_id="i2v-A14B")
    urgent = add(ledger, "urgent", S.READY, at=T0 + timedelta(minutes=2), model_id="animate-14B", priority=9)
    now = T0 + timedelta(minutes=3)
    take = [ledger.claim_next(S.READY, S.SAMPLING, model_id="i2v-A14B", now=now).id for _ in range(3)]
    assert take == [urgent, mine_new, other_old]


def test_claim_with_max_wait_lets_a_starved_model_go_first(ledger: Ledger) -> None:
    starved = add(ledger, "starved", S.READY, at=T0, model_id="animate-14B")
    mine = add(ledger, "mine", S.READY, at=T0 + timedelta(minutes=1), model_id="i2v-A14B")
    patience = timedelta(minutes=30)
    soon = T0 + timedelta(minutes=10)
    job = ledger.claim_next(S.READY, S.SAMPLING, model_id="i2v-A14B", max_wait=patience, now=soon)
    assert job.id == mine
    assert ledger.transition(mine, S.SAMPLING, S.READY, "put back")
    late = T0 + timedelta(minutes=45)
    job = ledger.claim_next(S.READY, S.SAMPLING, model_id="i2v-A14B", max_wait=patience, now=late)
    assert job.id == starved


def test_a_claim_for_one_model_moves_nothing_when_the_queue_wants_another(ledger: Ledger) -> None:
    other = add(ledger, "other", S.READY, at=T0, model_id="animate-14B", priority=3)
    mine = add(ledger, "mine", S.READY, at=T0, model_id="i2v-A14B")
    turn = {"model_id": "i2v-A14B", "now": T0 + timedelta(minutes=1)}
    assert ledger.peek_next(S.READY, **turn).id == other  # priority first: the pool must switch
    assert ledger.claim_next(S.READY, S.SAMPLING, **turn, if_model="i2v-A14B") is None
    assert [ledger.get(j).state for j in (other, mine)] == [S.READY, S.READY]
    assert len(ledger.events(other)) == len(ledger.events(mine)) == 4  # staged, queued, preprocessing, ready
    assert ledger.claim_next(S.READY, S.SAMPLING, **turn, if_model="animate-14B").id == other
    assert ledger.claim_next(S.READY, S.SAMPLING, **turn, if_model="i2v-A14B").id == mine


def test_the_peek_sees_what_the_claim_takes_and_moves_nothing(ledger: Ledger) -> None:
    ids = [add(ledger, f"j{i}", S.READY, at=T0 + timedelta(minutes=i), model_id="i2v-A14B") for i in range(3)]
    now = T0 + timedelta(hours=1)
    for expected in ids:
        peeked = ledger.peek_next(S.READY, model_id="i2v-A14B", now=now)
        assert peeked.id == expected and ledger.get(expected).state == S.READY
        assert ledger.claim_next(S.READY, S.SAMPLING, model_id="i2v-A14B", now=now).id == expected
    assert ledger.peek_next(S.READY, now=now) is None


def test_claim_filters_by_kind_and_checks_the_edge(ledger: Ledger) -> None:
    i2v = add(ledger, "still", S.QUEUED, kind="i2v")
    animate = add(ledger, "dance", S.QUEUED, kind="animate")
    assert ledger.claim_next(S.QUEUED, S.PREPROCESSING, kinds=["animate"], now=T0).id == animate
    assert ledger.claim_next(S.QUEUED, S.PREPROCESSING, kinds=["animate"], now=T0) is None
    assert ledger.claim_next(S.QUEUED, S.PREPROCESSING, kinds={"i2v", "animate"}, now=T0).id == i2v
    with pytest.raises(IllegalTransition, match="queued -> sampling is not a legal move"):
        ledger.claim_next(S.QUEUED, S.SAMPLING)


def test_claim_sets_fields_and_message(ledger: Ledger) -> None:
    job_id = add(ledger, state=S.READY)
    job = ledger.claim_next(S.READY, S.SAMPLING, message="sent to the pool (pid 42)", phase="load", now=T0)
    assert job.id == job_id and job.phase == "load"
    assert ledger.events(job_id)[-1].message == "sent to the pool (pid 42)"


# ---- progress, timings, cancel, retry ----------------------------------------------------------


def test_progress_is_recorded_only_while_running(ledger: Ledger) -> None:
    queued = add(ledger, "q", S.QUEUED)
    running = add(ledger, "s", S.SAMPLING)
    events = len(ledger.events(running))
    assert ledger.record_progress(running, "sampling", 3, 40, now=T0)
    assert not ledger.record_progress(queued, "sampling", 3, 40)
    job = ledger.get(running)
    assert (job.phase, job.step, job.total_steps, job.progress_at) == ("sampling", 3, 40, T0)
    assert len(ledger.events(running)) == events  # progress is not a state change
    assert ledger.get(queued).step is None


def test_timings_add_up_per_phase(ledger: Ledger) -> None:
    job_id = add(ledger, state=S.SAMPLING)
    ledger.record_timing(job_id, "preprocess", 1.5)
    ledger.record_timing(job_id, "sampling", 10.25)
    ledger.record_timing(job_id, "sampling", 2.0)
    assert ledger.get(job_id).timings_json == {"preprocess": 1.5, "sampling": 12.25}
    with pytest.raises(JobNotFound):
        ledger.record_timing("20990101-000000-zzzz", "sampling", 1.0)


def test_cancel_from_each_unfinished_state_and_not_after_the_end(ledger: Ledger) -> None:
    for state in [S.STAGED, S.QUEUED, S.PREPROCESSING, S.READY, S.SAMPLING, S.FINALIZING]:
        job_id = add(ledger, state.value, state)
        assert ledger.cancel(job_id, "changed my mind") == state
        assert ledger.get(job_id).state == S.CANCELLED
        assert ledger.events(job_id)[-1].message == "changed my mind"
    for state in [S.DONE, S.FAILED, S.REJECTED, S.CANCELLED]:
        job_id = add(ledger, state.value, state)
        with pytest.raises(
            IllegalTransition, match=f"cannot cancel: it has already ended \\({state.value}\\)"
        ):
            ledger.cancel(job_id)
        assert ledger.get(job_id).state == state


def test_retry_gives_a_fresh_attempt_budget_and_keeps_the_history(ledger: Ledger) -> None:
    job_id = add(ledger, state=S.SAMPLING, max_attempts=1)
    ledger.record_progress(job_id, "sampling", 7, 40)
    assert ledger.record_failure(job_id, S.SAMPLING, "NaN in latents", "internal", True, now=T0) == S.FAILED
    failed = ledger.get(job_id)
    assert (failed.attempts, failed.error_kind, failed.last_error) == (1, "internal", "NaN in latents")

    job = ledger.retry(job_id[:12])
    assert job.state == S.QUEUED
    assert (job.attempts, job.last_error, job.error_kind, job.retry_after, job.step) == (
        0,
        None,
        None,
        None,
        None,
    )
    messages = [e.message for e in ledger.events(job_id)]
    assert any("NaN in latents" in m for m in messages) and messages[-1] == "retried by user"
    with pytest.raises(IllegalTransition, match="queued -> queued is not a legal move"):
        ledger.retry(job_id)


def test_retry_of_a_job_cancelled_before_acceptance_asks_for_a_resubmission(ledger: Ledger) -> None:
    job_id = add(ledger, state=S.STAGED)
    ledger.cancel(job_id)
    with pytest.raises(
        IllegalTransition, match="cancelled before it was accepted; submit the manifest again"
    ):
        ledger.retry(job_id)
    accepted = add(ledger, "accepted", S.QUEUED)
    ledger.cancel(accepted)
    assert ledger.retry(accepted).state == S.QUEUED
    for state in (S.DONE, S.REJECTED):
        with pytest.raises(IllegalTransition):
            ledger.retry(add(ledger, state.value, state))


def test_threads_sharing_one_ledger_claim_each_job_once(ledger: Ledger) -> None:
    ids = {add(ledger, f"job{i}", S.QUEUED, at=T0 + timedelta(seconds=i)) for i in range(12)}
    taken: list[str] = []
    errors: list[BaseException] = []

    def claim_all() -> None:
        try:
            while (job := ledger.claim_next(S.QUEUED, S.PREPROCESSING)) is not None:
                taken.append(job.id)
                ledger.record_progress(job.id, "prepare", 1, 1)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=claim_all) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(taken) == sorted(ids)


# ---- several processes ----------------------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import sys
    from daemon.ledger import Ledger
    from daemon.states import JobState as S
    url, name = sys.argv[1], sys.argv[2]
    ledger = Ledger.open(url, busy_timeout_s=20)  # both processes create/upgrade the new database at once
    for i in range(15):
        job = ledger.add_staged(f"{name}-{i}", "i2v", f"inbox/{name}-{i}.toml", None)
        assert ledger.transition(job.id, S.STAGED, S.QUEUED, "accepted")
    print("added", flush=True)
    sys.stdin.readline()  # claim together
    taken = []
    while (job := ledger.claim_next(S.QUEUED, S.PREPROCESSING)) is not None:
        taken.append(job.id)
        ledger.record_progress(job.id, "prepare", 1, 1)
        assert ledger.transition(job.id, S.PREPROCESSING, S.READY, "prepared by " + name)
    print(" ".join(taken))
    """
)


def test_two_processes_share_one_new_database_without_locking_errors_or_double_claims(ledger_url: str) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, ledger_url, name],
            cwd=REPO,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name in ("A", "B")
    ]
    for worker in workers:
        assert worker.stdout.readline() == "added\n", worker.stderr.read()
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    results = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, err) in zip(workers, results, strict=True):
        assert worker.returncode == 0, err
    taken = [out.split() for out, _ in results]
    with Ledger.open(ledger_url) as ledger:
        ids = [job.id for job in ledger.list(limit=None)]
        assert len(ids) == 30
        assert sorted(taken[0] + taken[1]) == sorted(ids)  # every job exactly once
        assert ledger.counts_by_state()[S.READY] == 30
        assert ledger.audit() == []


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])  # SQLite has no row locks: its claimers queue for the file
def test_a_claim_passes_over_a_job_another_host_holds_instead_of_waiting(ledger_url: str) -> None:
    with Ledger.open(ledger_url, busy_timeout_s=30) as ledger:
        first = add(ledger, "first", S.READY, at=T0)
        second = add(ledger, "second", S.READY, at=T0 + timedelta(seconds=1))
        other_host = create_engine(ledger_url)
        with other_host.begin() as conn:  # another claimer's open transaction holds the first job's row
            conn.exec_driver_sql(f"SELECT id FROM jobs WHERE id = '{first}' FOR UPDATE")
            began = time.monotonic()
            assert ledger.peek_next(S.READY, now=T0).id == first  # a peek locks nothing and waits for nothing
            assert ledger.claim_next(S.READY, S.SAMPLING, now=T0).id == second  # SKIP LOCKED
            assert ledger.claim_next(S.READY, S.SAMPLING, now=T0) is None  # the held one is not waited for
            assert time.monotonic() - began < 5  # well under the 30 s lock timeout: nothing waited
        other_host.dispose()
        assert ledger.claim_next(S.READY, S.SAMPLING, now=T0).id == first  # released: next in line again


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_ledger_outlives_a_database_restart_and_a_crash(ledger_url: str, pg_cluster) -> None:
    with Ledger.open(ledger_url) as ledger:
        before = add(ledger, "before", S.QUEUED)
        for mode in ("fast", "immediate"):  # a clean shutdown, then one like a power cut (no checkpoint)
            pg_cluster.stop(mode)
            pg_cluster.start()
            # The same Ledger object: its pooled connections died with the server and are replaced unasked.
            assert ledger.claim_next(S.QUEUED, S.PREPROCESSING, now=T0).id == before
            assert ledger.transition(before, S.PREPROCESSING, S.QUEUED, f"put back after the {mode} restart")
        assert [e.message for e in ledger.events(before)][-1] == "put back after the immediate restart"
        assert ledger.audit() == []
