"""The SIGKILL matrix across filesystems: work/ and failed/ each on their own tmpfs, the inbox on the disk, so
that taking a job in, rejecting it and failing it are copies, not renames. A real `wanbox serve` is killed
after each copy is complete under its temporary name and after it was renamed into place (its source not yet
removed), restarted each time; the root must end with 0 lost, 0 doubled, 0 partial, 0 unexplained, and no
source left beside its copy. Needs root (mount), as on this machine and in CI.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.ledger import Ledger
from tests.faults.invariants import check_root
from tests.faults.killing import serve_dying_at, stop_cleanly, wait_killed, wait_rest
from tests.faults.test_disk_full import mount_tmpfs
from tests.faults.test_kill_matrix import CROSS_FS_POINTS, Jobs
from tests.faults.totals import TOTALS, Totals
from tests.workers.harness import Root

pytestmark = pytest.mark.timeout(300)


def phases(jobs: Jobs) -> list[tuple[str, Callable[[], None]]]:
    """(kill point, what reaches it): each cross-filesystem move of accept, reject and fail, flat and folder."""
    return [
        ("accept.copied", lambda: jobs.good("c01")),
        ("accept.copy_placed", lambda: jobs.good("c02")),
        ("accept.copied", lambda: jobs.good("c03", folder=True)),
        ("accept.copy_placed", lambda: jobs.good("c04", folder=True)),
        ("accept.copy_placed:2", lambda: jobs.good("c05")),  # the manifest, after its image
        ("reject.copied", lambda: jobs.bad("x06", folder=True)),
        ("reject.copy_placed", lambda: jobs.bad("x07", folder=True)),
        ("reject.copied", lambda: jobs.duplicate("x08", of="c01")),
        ("reject.copy_placed:2", lambda: jobs.duplicate("x09", of="c02")),
        ("fail.copied", lambda: jobs.failing("f10")),
        ("fail.copy_placed", lambda: jobs.failing("f11")),
    ]


def test_a_sigkill_inside_every_cross_filesystem_move_loses_doubles_and_tears_nothing(tmp_path: Path) -> None:
    r = Root(tmp_path, jobs={"max_attempts": 2})
    mount_tmpfs(r.work, "64m")
    mount_tmpfs(r.failed, "64m")
    jobs = Jobs(r)
    plan = phases(jobs)
    assert {point.partition(":")[0] for point, _ in plan} == CROSS_FS_POINTS
    try:
        for point, reach in plan:
            serve_dying_at(r, point)
            reach()
            wait_killed(r, point)
        serve_dying_at(r, None)
        rows = wait_rest(r, jobs.names, timeout=90)
        stop_cleanly(r)

        with Ledger.open(r.root / "state" / "wanbox.db") as ledger:
            totals, problems = check_root(r.root, jobs.names, ledger)
            assert ledger.audit() == []
        TOTALS.add(Totals(jobs=len(jobs.names), kills=len(plan)))
        TOTALS.add(totals)
        assert problems == [], "\n".join(problems)
        states = {name: row.state.value for name, row in rows.items()}
        assert states == {n: ("done" if n[0] == "c" else "failed" if n[0] == "f" else "rejected")
                          for n in jobs.names}, states  # fmt: skip
        outbox = sorted(p.name for p in r.outbox.iterdir())
        assert outbox == sorted(f"{n}.{s}" for n in jobs.names if n[0] == "c" for s in ("mp4", "jpg", "json"))
        failed = sorted(os.listdir(r.failed))
        assert failed == sorted(n for n in jobs.names if n[0] != "c"), failed  # no -2: a redo, never a copy
        for name in ("x08", "x09"):  # duplicates: the image went with the manifest, once
            image = "c01.jpg" if name == "x08" else "c02.jpg"
            assert sorted(os.listdir(r.failed / name)) == sorted(["error.txt", image, f"{name}.toml"])
        for name in ("f10", "f11"):
            assert (r.failed / name / "error.txt").is_file() and (r.failed / name / f"{name}.toml").is_file()
            assert not (r.work / rows[name].id / "inbox").exists()  # the source went once the copy was placed
        assert os.listdir(r.inbox) == []  # nothing left beside its copy, nothing put back twice
        log = r.log_text()
        assert "supervisor loop error" not in log and "internal error" not in log, log[-3000:]
    finally:
        r.cleanup()
        for where in (r.work, r.failed):
            subprocess.run(["umount", "-l", str(where)], check=False)
