"""A full disk under a running daemon: a small tmpfs mounted over the root's outbox, filled to the last byte.

Deliveries fail saying "disk full" and which folder, nothing partial reaches the outbox, the jobs wait (their
attempts untouched) and deliver once space returns. Needs root (mount), as on this machine and in CI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.faults.invariants import check_root
from tests.faults.totals import TOTALS
from tests.workers.harness import Root, manifest_text, wait_for

pytestmark = pytest.mark.timeout(120)


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    # Not a skip: CI runs as root, and a fault suite that quietly skips its full disk proves nothing.
    assert done.returncode == 0, f"cannot mount a tmpfs at {where} (this test needs root): {done.stderr}"


def fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s filesystem."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                continue
    return filler


def outbox_files(outbox: Path) -> set[str]:
    return {p.name for p in outbox.iterdir()} - {"filler.bin"}


def test_full_outbox_waits_without_partial_files_and_delivers_when_space_returns(tmp_path: Path) -> None:
    r = Root(tmp_path, jobs={"max_attempts": 2, "backoff_base_seconds": 0.3, "backoff_cap_seconds": 0.3})
    mount_tmpfs(r.outbox, "256k")
    try:
        filler = fill(r.outbox)
        r.serve()
        names = ["full-a", "full-b"]
        for name in names:
            r.drop(name, manifest_text(image=f"\"{name}.jpg\"", prompt=name), image=f"{name}.jpg")
        TOTALS.jobs += len(names)

        def waiting_for_space() -> bool:
            rows = [r.job(n) for n in names]
            return all(row is not None and "disk full" in (row.last_error or "") for row in rows)

        wait_for(waiting_for_space, 60, lambda: f"no disk-full reason\n{r.log_text()[-3000:]}")
        wait_for(lambda: r.job(names[0]).attempts == 0 and len(events(r, names[0], "delivery waits")) >= 3, 30,
                 "the delivery was not retried")  # several tries, none of them charged to the job
        for name in names:
            job = r.job(name)
            assert job.state.value in ("ready", "sampling", "finalizing"), job.state
            assert job.attempts == 0, job.attempts  # the host's full disk is not the job's fault
            assert f"the outbox {r.outbox}" in job.last_error and "free" in job.last_error, job.last_error
        assert outbox_files(r.outbox) == set(), outbox_files(r.outbox)  # no partial video, no .tmp leftovers
        status = r.cli("show", names[0])
        assert "disk full" in status.stdout, status.stdout

        filler.unlink()  # space returns: the waiting jobs deliver on their own
        for name in names:
            r.wait_state(name, "done", timeout=60)
        assert {f"{n}{s}" for n in names for s in (".mp4", ".json", ".jpg")} == outbox_files(r.outbox)
        with r.ledger() as ledger:
            totals, problems = check_root(r.root, names, ledger)
        TOTALS.add(totals)
        assert not problems, problems
        assert r.stop() == 0
    finally:
        r.cleanup()
        subprocess.run(["umount", "-l", str(r.outbox)], check=False)


def events(r: Root, name: str, text: str) -> list[str]:
    with r.ledger() as ledger:
        return [e.message for e in ledger.events(r.job(name).id) if text in (e.message or "")]


def test_outbox_staging_removes_its_temp_file_on_a_full_disk(tmp_path: Path) -> None:
    """The unit under the daemon: a delivery into a full outbox leaves nothing behind and raises ENOSPC."""
    from daemon.diskspace import is_disk_full
    from daemon.outbox import Outbox
    from tests.workers.fake_pool_worker import write_mp4

    video = tmp_path / "v.mp4"
    write_mp4(video, 5, 64, 48, 16)
    outbox = tmp_path / "outbox"
    mount_tmpfs(outbox, "64k")
    try:
        filler = fill(outbox)
        os.truncate(filler, filler.stat().st_size - 8192)  # room for part of the video only
        with pytest.raises(OSError) as caught:
            Outbox(outbox).deliver(video, "x", {"job_id": "j"})
        assert is_disk_full(caught.value)
        assert {p.name for p in outbox.iterdir()} == {"filler.bin"}
        TOTALS.jobs += 1
    finally:
        subprocess.run(["umount", "-l", str(outbox)], check=False)


def test_a_full_work_disk_holds_the_job_without_spending_attempts_and_it_runs_when_space_returns(
        tmp_path: Path) -> None:
    """The inbox and work/ share one filesystem (as the README asks), a tmpfs filled to the last byte after the
    upload: the job is accepted (a rename needs no space), its preparation finds the disk full, and the job waits
    saying which folder, attempts untouched, until space returns; nothing half-written is left behind."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "2m")
    try:
        r = Root(tmp_path, paths={"inbox": str(disk / "inbox"), "work": str(disk / "work")},
                 jobs={"max_attempts": 2, "backoff_base_seconds": 0.3, "backoff_cap_seconds": 0.3})
        r.inbox, r.work = disk / "inbox", disk / "work"
        r.inbox.mkdir()
        r.work.mkdir()
        r.drop("workfull", manifest_text(image="\"workfull.jpg\"", prompt="workfull"), image="workfull.jpg")
        filler = fill(disk)
        TOTALS.jobs += 1
        r.serve()

        def waits_for_space() -> bool:
            job = r.job("workfull")
            return (job is not None and str(job.error_kind) == "disk" and job.state.value in ("queued", "ready")
                    and len(events(r, "workfull", "waits for disk space")) >= 3)

        wait_for(waits_for_space, 60, lambda: f"the job does not wait for space\n{r.log_text()[-3000:]}")
        job = r.job("workfull")
        assert job.attempts == 0, job.attempts  # the host's full disk is not the job's fault, however often
        assert f"disk full: the folder {r.work / job.id}" in job.last_error and "free of" in job.last_error, \
            job.last_error
        assert "without counting against its attempts" in job.last_error, job.last_error
        # Between two tries the job is briefly preprocessing again: status says why while it waits.
        wait_for(lambda: "waiting: disk full" in r.cli("status").stdout, 10, lambda: r.cli("status").stdout)
        leftovers = [p.name for p in (r.work / job.id).rglob("*") if p.name.startswith(".") and p.is_file()]
        assert leftovers == [], leftovers  # no half-written PNG or record holds on to the space
        assert not any(r.failed.iterdir()) if r.failed.exists() else True  # nothing was failed or rejected

        filler.unlink()  # space returns: the job goes on by itself
        r.wait_state("workfull", "done", timeout=60)
        assert {"workfull.mp4", "workfull.json", "workfull.jpg"} <= {p.name for p in r.outbox.iterdir()}
        assert r.job("workfull").attempts == 0
        assert r.stop() == 0
    finally:
        r.cleanup()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_mp4_written_onto_a_full_disk_is_a_disk_failure_that_waits(tmp_path: Path) -> None:
    """PyAV (FFmpeg) reports ENOSPC in its own exception type, with or without errno: the worker still calls it
    disk full, names the folder, and lets the job wait (retryable) instead of failing it as an internal error."""
    import torch

    from pipeline.video import write_mp4
    from pipeline.worker import classify_failure

    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64k")
    try:
        fill(disk)
        frames = torch.rand(3, 9, 64, 64) * 2 - 1
        with pytest.raises(Exception) as raised:
            write_mp4(frames, disk / "output.mp4", 16)
        error = classify_failure("job-1", raised.value)
        assert error.kind == "disk" and error.retryable, (error, raised.value)
        assert "disk full" in error.message and str(disk) in error.message, error.message
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
