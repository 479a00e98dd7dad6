"""The inbox watcher: temporary names, both layouts, the settle window, events and inbox outages.

Real directories and files; real watchdog observers (inotify and polling).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.watcher import InboxOutage, InboxWatcher, StabilityTracker, is_temporary, scan_inbox


@pytest.mark.parametrize("name", [".cat.jpg.Xy12Ab", ".job.toml", "job.toml.part", "a.filepart", "b.tmp",
                                  "notes.txt~", ".DS_Store", "Thumbs.db", ".~tmp~", "x.crdownload"])
def test_temporary_and_clutter_names(name: str) -> None:
    assert is_temporary(name)


@pytest.mark.parametrize("name", ["cat.jpg", "job.toml", "my.part.toml", "tmp.toml", "a~b.toml"])
def test_ordinary_names_are_not_temporary(name: str) -> None:
    assert not is_temporary(name)


def test_scan_finds_both_layouts_and_skips_everything_else(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "folderjob").mkdir(parents=True)
    (inbox / "folderjob" / "job.toml").write_text("x")
    (inbox / "uploading").mkdir()  # a folder without job.toml yet: not a job
    (inbox / "uploading" / "cat.jpg").write_text("x")
    (inbox / ".~tmp~").mkdir()
    (inbox / ".~tmp~" / "job.toml").write_text("x")
    (inbox / ".hidden").mkdir()
    (inbox / ".hidden" / "job.toml").write_text("x")
    (inbox / "flat.toml").write_text("x")
    (inbox / ".flat2.toml.a1b2c3").write_text("x")
    (inbox / "flat3.toml.part").write_text("x")
    (inbox / "cat.jpg").write_text("x")
    found = scan_inbox(inbox)
    assert [c.key for c in found] == ["flat.toml", "folderjob/job.toml"]
    assert found[0].folder is None and found[0].default_name == "flat"
    assert found[1].folder == inbox / "folderjob" and found[1].default_name == "folderjob"


def test_missing_inbox_is_an_outage_not_an_empty_inbox(tmp_path: Path) -> None:
    with pytest.raises(InboxOutage, match="not reachable"):
        scan_inbox(tmp_path / "gone")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InboxOutage, match="not a directory"):
        scan_inbox(tmp_path / "file")


def test_stable_only_after_size_and_mtime_hold_for_the_settle_window(tmp_path: Path) -> None:
    path = tmp_path / "growing.bin"
    tracker = StabilityTracker(settle_seconds=10)
    assert not tracker.is_stable(path, now=0)  # missing
    path.write_bytes(b"a")
    assert not tracker.is_stable(path, now=100)  # first sight starts the window
    assert not tracker.is_stable(path, now=105)
    with open(path, "ab") as fh:  # an in-place append (SFTP style) restarts it
        fh.write(b"b")
    assert not tracker.is_stable(path, now=109)
    assert not tracker.is_stable(path, now=118)
    assert tracker.is_stable(path, now=119.5)
    os.utime(path, ns=(0, 12345))  # same size, new mtime: changed again
    assert not tracker.is_stable(path, now=120)


@pytest.mark.parametrize("polling", [False, True])
def test_events_wake_the_supervisor_and_outage_recovers(tmp_path: Path, polling: bool, caplog) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = InboxWatcher(inbox, rescan_seconds=3600, polling=polling)
    watcher.start()
    try:
        assert watcher.scan() == []
        assert not watcher.due()
        (inbox / "a.toml").write_text("x")
        deadline = time.monotonic() + 5
        while not watcher.due() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.due(), "no filesystem event arrived"
        assert [c.key for c in watcher.scan()] == ["a.toml"]
        inbox.rename(tmp_path / "unmounted")  # the share goes away
        assert watcher.scan() is None
        assert watcher.outage is not None
        assert "INBOX OUTAGE" in caplog.text
        (tmp_path / "unmounted").rename(inbox)
        assert [c.key for c in watcher.scan()] == ["a.toml"]
        assert watcher.outage is None
    finally:
        watcher.stop()


def test_rescan_is_due_after_the_interval_without_events(tmp_path: Path) -> None:
    watcher = InboxWatcher(tmp_path, rescan_seconds=30)
    watcher.scan(now=1000)
    assert not watcher.due(now=1029)
    assert watcher.due(now=1030)
