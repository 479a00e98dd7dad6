"""Pruning the work folders of delivered jobs: `wanbox prune` and the daemon's [jobs] prune_after_days.

A real ledger (SQLite and PostgreSQL) and real folders. Only `done` jobs older than the cut-off lose work/<id>/; failed jobs keep
it for `wanbox retry`; a link planted as a work folder is never followed.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import load_config
from daemon.ledger import Ledger
from daemon.prune import prune_done
from daemon.states import JobState
from daemon.supervisor import Supervisor
from tests.workers.harness import Root

S = JobState
NOW = datetime.now(timezone.utc)
TO_DONE = (S.QUEUED, S.PREPROCESSING, S.READY, S.SAMPLING, S.FINALIZING, S.DONE)


def add_job(ledger: Ledger, work: Path, name: str, days_ago: float, path: tuple[JobState, ...] = TO_DONE) -> Path:
    """A job moved along `path` `days_ago` days ago, with a work folder of 3 files (1000 + 2000 + 3000 bytes)."""
    at = NOW - timedelta(days=days_ago)
    job = ledger.add_staged(name, "i2v", work.parent / "inbox" / f"{name}.toml", None, now=at)
    folder = work / job.id
    (folder / "inbox").mkdir(parents=True)
    for i, size in enumerate((1000, 2000, 3000)):
        (folder / ("inbox" if i == 0 else ".") / f"f{i}").write_bytes(b"x" * size)
    state = S.STAGED
    for to in path:
        assert ledger.transition(job.id, state, to, f"to {to.value}", now=at, work_dir=str(folder))
        state = to
    return folder


@pytest.fixture
def ledger(ledger_url: str):  # SQLite and PostgreSQL (conftest)
    ledger = Ledger.open(ledger_url)
    yield ledger
    ledger.close()


def test_only_long_delivered_jobs_lose_their_work_folder(tmp_path: Path, ledger: Ledger) -> None:
    work = tmp_path / "work"
    old = add_job(ledger, work, "old", days_ago=20)
    recent = add_job(ledger, work, "recent", days_ago=2)
    failed = add_job(ledger, work, "failed", days_ago=20, path=(S.QUEUED, S.PREPROCESSING, S.FAILED))
    would = prune_done(ledger, work, timedelta(days=14), dry_run=True)
    assert [(p.name, p.bytes) for p in would] == [("old", 6000)] and old.is_dir()  # a dry run deletes nothing
    gone = prune_done(ledger, work, timedelta(days=14))
    assert [(p.name, p.folder) for p in gone] == [("old", old)]
    assert not old.exists() and recent.is_dir() and failed.is_dir()
    assert ledger.get(gone[0].job_id).state == S.DONE and ledger.audit() == []  # the record stays, consistent
    assert prune_done(ledger, work, timedelta(days=14)) == []  # nothing left to do


def test_a_link_in_place_of_a_work_folder_is_not_followed(tmp_path: Path, ledger: Ledger) -> None:
    work = tmp_path / "work"
    folder = add_job(ledger, work, "linked", days_ago=30)
    elsewhere = tmp_path / "precious"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    assert prune_done(ledger, work, timedelta(days=1)) == []
    assert (elsewhere / "f1").is_file() and folder.is_symlink()


def test_the_command_reports_what_it_deleted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, tmp_path / "root")
    cfg.paths.ledger.parent.mkdir(parents=True, exist_ok=True)
    with Ledger.open(cfg.paths.ledger) as ledger:
        old = add_job(ledger, cfg.paths.work, "old", days_ago=10)
        add_job(ledger, cfg.paths.work, "new", days_ago=1)
    assert main(["prune", "--root", str(tmp_path / "root"), "--older-than", "7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would delete {old} (old, 0.0 MiB)" in out and "1 job(s) delivered over 7 days ago" in out
    assert old.is_dir()
    assert main(["prune", "--root", str(tmp_path / "root"), "--older-than", "7", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["name"] == "old" and entry["bytes"] == 6000 and not old.exists()


def test_the_daemon_prunes_when_configured(tmp_path: Path) -> None:
    for days, kept in ((0.0, True), (7.0, False)):
        root = Root(tmp_path / f"days{days:g}", jobs={"prune_after_days": days})
        sup = Supervisor(load_config(root.config))
        sup.ledger = Ledger.open(tmp_path / f"days{days:g}" / "l.db")
        try:
            folder = add_job(sup.ledger, sup.paths.work, "old", days_ago=30)
            sup.prune_work()
            assert folder.is_dir() == kept, f"prune_after_days = {days}"
        finally:
            sup.ledger.close()
