"""An inbox that vanishes and comes back while jobs are staged and running: renamed away, then its mount gone
(the share's empty mount point left behind), each time restored.

No job is lost or rejected for it, status shows the INBOX OUTAGE, running jobs go on, staged jobs resume.
Needs root for the bind mount, as on this machine and in CI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.faults.invariants import check_root
from tests.faults.totals import TOTALS
from tests.workers.harness import Root, manifest_text, wait_for, write_image

pytestmark = pytest.mark.timeout(150)


def bind(src: Path, where: Path) -> None:
    done = subprocess.run(["mount", "--bind", str(src), str(where)], capture_output=True, text=True)
    # Not a skip: CI runs as root, and an outage test that quietly skips proves nothing.
    assert done.returncode == 0, f"cannot bind-mount {src} at {where} (this test needs root): {done.stderr}"


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def status_shows_outage(r: Root) -> bool:
    return "OUTAGE" in r.cli("status").stdout


def test_inbox_renamed_away_and_unmounted_loses_nothing(tmp_path: Path) -> None:
    share = tmp_path / "share"  # what a network share would hold; bind-mounted as the inbox
    share.mkdir()
    r = Root(tmp_path, inbox={"settle_seconds": 0.2, "rescan_seconds": 0.3, "staged_deadline_seconds": 60})
    bind(share, r.inbox)
    r.knobs({"*": {"step_seconds": 0.01}, "long": {"step_seconds": 0.3}})
    names = ["long", "waits-1", "waits-2", "after"]
    try:
        r.serve()
        # 1. A running job and a staged one (its image not uploaded yet), then the inbox is renamed away.
        r.drop("long", manifest_text(image='"long.jpg"', steps=12), image="long.jpg")
        r.drop("waits-1", manifest_text(image='"w1.jpg"', prompt="waits 1"), image=None)
        r.wait_state("long", "sampling")
        r.wait_state("waits-1", "staged")
        away = tmp_path / "share.renamed"
        umount(r.inbox)
        os.rename(share, away)  # the share's folder itself gone
        os.rmdir(r.inbox)  # ... and then no inbox at all
        wait_for(lambda: status_shows_outage(r), 20, lambda: f"status shows no outage:\n{r.cli('status').stdout}")
        r.wait_state("long", "done")  # work already taken in goes on
        assert r.state("waits-1") == "staged", r.job("waits-1").last_error
        r.inbox.mkdir()
        os.rename(away, share)
        bind(share, r.inbox)
        write_image(r.inbox / "w1.jpg")
        r.wait_state("waits-1", "done")
        wait_for(lambda: not status_shows_outage(r), 20, "status still shows an outage")

        # 2. The mount goes away, leaving the empty mount point: an outage, not a deletion of staged manifests.
        r.drop("waits-2", manifest_text(image='"w2.jpg"', prompt="waits 2"), image=None)
        r.wait_state("waits-2", "staged")
        umount(r.inbox)
        assert os.listdir(r.inbox) == []
        wait_for(lambda: status_shows_outage(r), 20, lambda: f"status shows no outage:\n{r.cli('status').stdout}")
        assert "was a mount point and is not any more" in r.cli("status").stdout
        wait_for(lambda: "INBOX OUTAGE" in r.log_text(), 10, "no outage logged")
        assert r.state("waits-2") == "staged", r.job("waits-2").last_error
        bind(share, r.inbox)  # the share is back, with its files
        write_image(r.inbox / "w2.jpg")
        r.drop("after", manifest_text(image='"after.jpg"', prompt="after"), image="after.jpg")
        for name in ("waits-2", "after"):
            r.wait_state(name, "done")
        TOTALS.jobs += len(names)
        with r.ledger() as ledger:
            totals, problems = check_root(r.root, names, ledger)
            rejected = [j.name for j in ledger.list(limit=None) if j.state.value == "rejected"]
        TOTALS.add(totals)
        assert not problems and not rejected, (problems, rejected)
        assert r.stop() == 0
    finally:
        r.cleanup()
        umount(r.inbox)
