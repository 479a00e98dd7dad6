"""Staged jobs held back by the host, not by their uploader, on a real `wanbox serve`: a full work/ on another
filesystem while an upload is taken in, a full failed/ while a rejection is written, and an inbox outage longer
than the staging deadline. Each waits saying why (status, show), loses nothing, and goes on once the host is well.
Needs root (mount), as on this machine and in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.invariants import check_root
from tests.faults.test_disk_full import fill, mount_tmpfs
from tests.faults.test_kill_matrix import BAD
from tests.faults.totals import TOTALS
from tests.workers.harness import Root, manifest_text, wait_for, write_image

pytestmark = pytest.mark.timeout(150)


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".copying") or p.name.endswith(".tmp")]


def test_a_full_work_disk_on_another_filesystem_leaves_the_upload_in_the_inbox_until_space_returns(
        tmp_path: Path) -> None:
    """The inbox on one filesystem, work/ on a full tmpfs: copying the upload in fails; the inbox keeps it, byte
    for byte, the partial copy goes, status says "waiting: disk full: the folder <work>", the staging deadline
    does not run out, and the jobs (flat and folder layout) are taken in and run once space returns."""
    r = Root(tmp_path, inbox={"settle_seconds": 0.2, "rescan_seconds": 0.3, "staged_deadline_seconds": 3},
             jobs={"backoff_base_seconds": 0.3, "backoff_cap_seconds": 0.3})
    mount_tmpfs(r.work, "1m")
    names = ["spaceflat", "spacefolder"]
    try:
        filler = fill(r.work)
        r.drop("spaceflat", manifest_text(image='"spaceflat.jpg"', prompt="flat"), image="spaceflat.jpg")
        r.drop("spacefolder", manifest_text(image='"spacefolder.jpg"', prompt="folder"), image="spacefolder.jpg",
               folder=True)
        before = tree(r.inbox)
        TOTALS.jobs += len(names)
        r.serve()

        def waiting() -> bool:
            return all("disk full" in ((j := r.job(n)) and j.waiting_reason or "") for n in names)

        wait_for(waiting, 40, lambda: f"no disk-full wait\n{r.log_text()[-3000:]}")
        time.sleep(4)  # past the 3 s staging deadline, while full: the host's trouble is not the upload's
        for name in names:
            job = r.job(name)
            assert job.state.value == "staged" and job.attempts == 0, (job.state, job.last_error)
            assert f"disk full: the folder {r.work} has" in job.waiting_reason, job.waiting_reason
            assert "the upload stays in the inbox" in job.waiting_reason, job.waiting_reason
        assert tree(r.inbox) == before  # untouched (or restored), nothing lost
        assert leftovers(r.work) == [] and set(os.listdir(r.work)) == {"filler.bin"}, os.listdir(r.work)
        status = r.cli("status").stdout
        assert f"waiting: disk full: the folder {r.work}" in status, status
        assert "disk full" in r.cli("show", "spaceflat").stdout
        assert "internal error" not in r.log_text(), r.log_text()[-3000:]

        filler.unlink()  # space returns: both are taken in and run
        for name in names:
            r.wait_state(name, "done", timeout=60)
        assert os.listdir(r.inbox) == []
        with r.ledger() as ledger:
            totals, problems = check_root(r.root, names, ledger)
        TOTALS.add(totals)
        assert not problems, problems
        assert all(r.job(n).attempts <= 1 for n in names)
        assert r.stop() == 0
    finally:
        r.cleanup()
        umount(r.work)


def test_a_rejection_that_failed_cannot_hold_is_still_listed_with_its_reason(tmp_path: Path) -> None:
    """failed/ on a full tmpfs: a malformed manifest's error.txt cannot be written there, so the reason is the
    staged job's in the ledger (status and show list it, with what holds it back); when space returns it is
    rejected into failed/<name>/ as usual."""
    r = Root(tmp_path, inbox={"settle_seconds": 0.2, "rescan_seconds": 0.3},
             jobs={"backoff_base_seconds": 0.3, "backoff_cap_seconds": 0.3})
    mount_tmpfs(r.failed, "256k")
    try:
        filler = fill(r.failed)
        r.drop("nowhere", BAD, image="nowhere.jpg", folder=True)
        TOTALS.jobs += 1
        r.serve()

        def listed() -> bool:
            job = r.job("nowhere")
            return job is not None and "cannot be written to failed/" in (job.waiting_reason or "")

        wait_for(listed, 40, lambda: f"no reason recorded\n{r.log_text()[-3000:]}")
        job = r.job("nowhere")
        assert job.state.value == "staged", job.state
        assert f"disk full: the failed folder {r.failed}" in job.waiting_reason, job.waiting_reason
        assert "inputs.image" in job.waiting_reason, job.waiting_reason  # the rejection's own reason
        for args in (("status",), ("show", "nowhere")):
            out = r.cli(*args).stdout
            assert "cannot be written to failed/" in out and "inputs.image" in out, out
        assert (r.inbox / "nowhere" / "job.toml").read_text() == BAD  # nothing moved, nothing lost
        assert leftovers(r.failed) == [], leftovers(r.failed)

        filler.unlink()
        r.wait_state("nowhere", "rejected", timeout=30)
        reason = (r.failed / "nowhere" / "error.txt").read_text()
        assert "inputs.image" in reason, reason
        assert sorted(os.listdir(r.failed / "nowhere")) == ["error.txt", "job.toml", "nowhere.jpg"]
        assert not (r.inbox / "nowhere").exists()
        assert r.stop() == 0
    finally:
        r.cleanup()
        umount(r.failed)


def test_a_fifo_that_cannot_be_copied_to_failed_on_another_filesystem_is_listed_with_its_reason(
        tmp_path: Path) -> None:
    """A FIFO named like a manifest is never opened; with failed/ on another filesystem it cannot be moved there
    either (a copy would have to read it), so it stays in the inbox, its reason beside where it would have gone
    (failed/pipe/error.txt) and in the ledger, listed by status, the job staged (not staged again and again)."""
    r = Root(tmp_path, inbox={"settle_seconds": 0.2, "rescan_seconds": 0.3})
    mount_tmpfs(r.failed, "256k")
    try:
        os.mkfifo(r.inbox / "pipe.toml")
        r.serve()
        wait_for(lambda: "cannot be written to failed/" in ((j := r.job("pipe")) and j.waiting_reason or ""), 30,
                 lambda: f"no reason recorded\n{r.log_text()[-3000:]}")
        out = r.cli("status").stdout
        assert "not a special file" in out and "named pipe" in out, out
        assert os.path.lexists(r.inbox / "pipe.toml")
        assert "not a special file" in (r.failed / "pipe" / "error.txt").read_text()
        time.sleep(1)  # several retries: still the one job
        with r.ledger() as ledger:
            assert [j.name for j in ledger.list(limit=None)] == ["pipe"]
        TOTALS.jobs += 1
        assert r.stop() == 0
    finally:
        r.cleanup()
        umount(r.failed)


def test_an_inbox_outage_longer_than_the_staging_deadline_does_not_reject_a_waiting_upload(tmp_path: Path) -> None:
    """A staged job waits for its image; the inbox is renamed away for longer than the 3 s staging deadline; when
    it is back the image arrives: the job must be accepted, not rejected as overdue or "still changing"."""
    r = Root(tmp_path, inbox={"settle_seconds": 0.2, "rescan_seconds": 0.3, "staged_deadline_seconds": 3})
    try:
        r.serve()
        r.drop("outlived", manifest_text(image='"outlived.jpg"', prompt="outlived"), image=None)
        r.wait_state("outlived", "staged")
        wait_for(lambda: "not in the inbox" in (r.job("outlived").waiting_reason or ""), 10, "not waiting")
        away = tmp_path / "inbox.away"
        os.rename(r.inbox, away)
        wait_for(lambda: "OUTAGE" in r.cli("status").stdout, 20, "no outage shown")
        time.sleep(4)  # the outage outlasts the whole staging deadline
        assert r.state("outlived") == "staged"
        os.rename(away, r.inbox)
        write_image(r.inbox / "outlived.jpg")  # the upload goes on where it stopped
        r.wait_state("outlived", ("done", "rejected"), timeout=40)
        job = r.job("outlived")
        assert job.state.value == "done", job.last_error
        TOTALS.jobs += 1
        assert r.stop() == 0
    finally:
        r.cleanup()
        shutil.rmtree(tmp_path / "inbox.away", ignore_errors=True)
