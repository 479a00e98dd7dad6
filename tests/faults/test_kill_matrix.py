"""The SIGKILL matrix: a real `wanbox serve` is killed at every kill point of daemon/faults.py (every state
boundary, and inside each file operation of accept, reject, fail and finalize), restarted each time, and
the root must end with 0 lost, 0 delivered twice, 0 partial and 0 unexplained (tests/faults/invariants.py).

One root, one phase per point: phase i's daemon recovers what phase i-1's kill interrupted (and may itself
die in that recovery, which is the point too), then takes a fresh job made to reach point i.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.faults import POINTS
from daemon.ledger import Ledger
from tests.faults.invariants import check_root
from tests.faults.killing import serve_dying_at, stop_cleanly, wait_killed, wait_rest
from tests.faults.totals import TOTALS, Totals
from tests.workers.harness import Root, manifest_text

pytestmark = pytest.mark.timeout(300)

# The points inside a move onto another filesystem: killed in tests/faults/test_kill_crossfs.py (its own root).
CROSS_FS_POINTS = {"accept.copied", "accept.copy_placed", "reject.copied", "reject.copy_placed", "fail.copied",
                   "fail.copy_placed"}  # fmt: skip
BAD = 'schema = 1\nkind = "i2v"\nprompt = "bad"\n[video]\nsize = "832*480"\nframes = 5\n[inputs]\nimage = 7\n'


class Jobs:
    """Drops jobs made to reach a given kill point; remembers their names and the fake worker's knobs."""

    def __init__(self, r: Root) -> None:
        self.r, self.names, self.knobs = r, [], {}

    def good(self, name: str, folder: bool = False) -> None:
        self.names.append(name)
        self.r.drop(name, manifest_text(image=f'"{name}.jpg"', prompt=name), image=f"{name}.jpg", folder=folder)

    def failing(self, name: str) -> None:
        self.knobs[name] = {"error": "input", "error_retryable": False}  # a permanent error: failed/ at once
        self.r.knobs(self.knobs)
        self.good(name)

    def bad(self, name: str, folder: bool = False) -> None:
        self.names.append(name)
        self.r.drop(name, BAD, image=f"{name}.jpg" if folder else None, folder=folder)

    def duplicate(self, name: str, of: str) -> None:
        """The same manifest and image bytes as job `of`: rejected as a duplicate, its image moved too."""
        self.names.append(name)
        self.r.drop(name, manifest_text(image=f'"{of}.jpg"', prompt=of), image=f"{of}.jpg")


def phases(jobs: Jobs) -> list[tuple[str, Callable[[], None]]]:
    """(kill point, what reaches it) in order; every point of faults.POINTS appears at least once."""
    return [
        ("state.preprocessing", lambda: jobs.good("g01")),
        ("state.ready", lambda: jobs.good("g02")),
        ("state.sampling", lambda: jobs.good("g03")),
        ("accept.intent", lambda: jobs.good("g04")),
        ("accept.moved_input", lambda: jobs.good("g05")),
        ("accept.moved_manifest", lambda: jobs.good("g06", folder=True)),
        ("accept.recorded", lambda: jobs.good("g07")),
        ("finalize.begin", lambda: jobs.good("g08")),
        ("finalize.intent", lambda: jobs.good("g09")),
        ("finalize.staged", lambda: jobs.good("g10")),
        ("finalize.published", lambda: jobs.good("g11")),
        ("finalize.staged:3", lambda: jobs.good("g12")),
        ("finalize.published:2", lambda: jobs.good("g13")),
        ("finalize.recorded", lambda: jobs.good("g14")),
        ("finalize.cleaned", lambda: jobs.good("g15")),
        ("fail.counted", lambda: jobs.failing("f1")),
        ("fail.intent", lambda: jobs.failing("f2")),
        ("fail.reason_written", lambda: jobs.failing("f3")),
        ("fail.pointer_written", lambda: jobs.failing("f4")),
        ("fail.moved", lambda: jobs.failing("f5")),
        ("reject.intent", lambda: jobs.bad("r1")),
        ("reject.dir_made", lambda: jobs.bad("r2")),
        ("reject.reason_written", lambda: jobs.bad("r3", folder=True)),
        ("reject.moved_folder", lambda: jobs.bad("r4", folder=True)),
        ("reject.moved_input", lambda: jobs.duplicate("r5", of="g01")),
        ("reject.moved_manifest", lambda: jobs.duplicate("r6", of="g02")),
        ("reject.recorded", lambda: jobs.bad("r7")),
    ]


def test_a_sigkill_at_every_kill_point_loses_doubles_and_tears_nothing(tmp_path: Path) -> None:
    r = Root(tmp_path, jobs={"max_attempts": 2})
    jobs = Jobs(r)
    plan = phases(jobs)
    # A new point must join a matrix: this one, or the cross-filesystem one (tests/faults/test_kill_crossfs.py).
    assert {point.partition(":")[0] for point, _ in plan} | CROSS_FS_POINTS == set(POINTS)
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
        assert totals.broken() == 0
        # The outcomes themselves: every good job delivered once under its own name, each failure and rejection
        # in failed/<its name>/ (no -2: a redo is the same step, never a second copy), the inbox empty.
        states = {name: row.state.value for name, row in rows.items()}
        assert states == {n: ("done" if n[0] == "g" else "failed" if n[0] == "f" else "rejected")
                          for n in jobs.names}, states  # fmt: skip
        outbox = sorted(p.name for p in r.outbox.iterdir())
        assert outbox == sorted(f"{n}.{s}" for n in jobs.names if n[0] == "g" for s in ("mp4", "jpg", "json"))
        failed = sorted(os.listdir(r.failed))
        assert failed == sorted(n for n in jobs.names if n[0] != "g"), failed
        for name in failed:
            reason = (r.failed / name / "error.txt").read_text()
            assert rows[name].id in reason or "identical to job" in reason or "inputs.image" in reason, reason
        for name in ("r5", "r6"):  # duplicates: the image went with the manifest
            assert sorted(os.listdir(r.failed / name)) == ["error.txt", "g01.jpg" if name == "r5" else "g02.jpg",
                                                           f"{name}.toml"]  # fmt: skip
        for name in (n for n in jobs.names if n[0] == "g"):
            sidecar = json.loads((r.outbox / f"{name}.json").read_text())
            assert sidecar["job_id"] == rows[name].id and rows[name].outputs_json["video"].endswith(f"{name}.mp4")
        assert os.listdir(r.inbox) == []
        log = r.log_text()
        assert "supervisor loop error" not in log and "internal error" not in log, log[-3000:]
    finally:
        r.cleanup()
