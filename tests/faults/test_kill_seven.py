"""The seven failures of the randomized fault run (issue "exactly once under crashes"), each reproduced by a
SIGKILL at the exact point through the test hook (WANBOX_DIE_AT), on real `wanbox serve` processes with the
fake pool worker, then checked after a restart: the step is redone, never done twice, and always says why.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from daemon.ledger import Ledger
from tests.faults.invariants import check_root
from tests.faults.killing import serve_dying_at, stop_cleanly, wait_killed, wait_rest
from tests.faults.totals import TOTALS, Totals
from tests.workers.harness import Root, manifest_text, wait_for, write_image

pytestmark = pytest.mark.timeout(180)
BAD_SHA = "0" * 64


def settle(r: Root, names: list[str], kills: int) -> None:
    """The root at rest is sound (check_root), counted into the suite's totals."""
    with Ledger.open(r.root / "state" / "wanbox.db") as ledger:
        totals, problems = check_root(r.root, names, ledger)
        assert ledger.audit() == []
    TOTALS.add(Totals(jobs=len(names), kills=kills))
    TOTALS.add(totals)
    assert problems == [], "\n".join(problems)


def events(r: Root, name: str) -> list[str]:
    with r.ledger() as ledger:
        return [e.message for e in ledger.events(r.job(name).id)]


def test_1_3_a_delivery_and_attempts_survive_supervisor_kills(tmp_path: Path) -> None:
    """1: killed after the mp4 is published, before the poster and sidecar: the restart completes that delivery
    under the same name (no -2, no re-sampling, no temp files); -2 is for another job of the same name only.
    3: a job whose sampling is interrupted by supervisor kills more often than its max_attempts is not failed
    for it, while a job that kills the pool is failed after max_attempts with its files and reason in failed/.
    And a video that is not what the job asked for is never delivered: it fails saying what differs."""
    r = Root(tmp_path, jobs={"max_attempts": 2})
    try:
        serve_dying_at(r, "finalize.published")
        r.drop("one", manifest_text(image='"one.jpg"', prompt="one"), image="one.jpg")
        wait_killed(r, "finalize.published")
        assert sorted(p.name for p in r.outbox.iterdir()) == ["one.mp4"]  # the window of failure 1
        serve_dying_at(r, None)
        rows = wait_rest(r, ["one"])
        assert sorted(p.name for p in r.outbox.iterdir()) == ["one.jpg", "one.json", "one.mp4"]
        assert json.loads((r.outbox / "one.json").read_text())["job_id"] == rows["one"].id
        assert rows["one"].attempts == 0  # completed as it was, not sampled again
        assert not any("recovered at start-up" in m for m in events(r, "one"))
        # Another job of the same name: its own name is taken by a different job, so it gets -2.
        (r.inbox / "one.toml").write_text(manifest_text(image='"one2.jpg"', prompt="another one"))
        write_image(r.inbox / "one2.jpg", color=(9, 9, 9))
        wait_for(lambda: (r.outbox / "one-2.json").exists(), 30, lambda: r.log_text()[-3000:])
        stop_cleanly(r)

        # 3: three supervisor kills while sampling, max_attempts 2: still delivered.
        for _ in range(3):
            serve_dying_at(r, "state.sampling")
            if not (r.inbox / "slow.toml").exists() and r.job("slow") is None:
                r.drop("slow", manifest_text(image='"slow.jpg"', prompt="slow"), image="slow.jpg")
            wait_killed(r, "state.sampling")
        # This one kills the pool at its first step, every time; the other's video has 4 frames too many.
        r.knobs({"crasher": {"exit_at_step": 1}, "long": {"extra_frames": 4}})
        serve_dying_at(r, None)
        r.drop("crasher", manifest_text(image='"crasher.jpg"', prompt="crash"), image="crasher.jpg")
        r.drop("long", manifest_text(image='"long.jpg"', prompt="long"), image="long.jpg")
        rows = wait_rest(r, ["slow", "crasher", "long"])
        assert rows["long"].state.value == "failed" and rows["long"].error_kind == "output"
        assert "9 frames decoded, the job asks for 5 (video.frames)" in rows["long"].last_error
        assert not any(p.name.startswith("long") for p in r.outbox.iterdir())  # nothing of it delivered
        slow = rows["slow"]
        assert slow.state.value == "done" and (slow.attempts, slow.excused_attempts) == (3, 3), events(r, "slow")
        assert any("not the job's fault" in m for m in events(r, "slow"))
        crasher = rows["crasher"]
        assert crasher.state.value == "failed" and crasher.attempts == 2 and crasher.excused_attempts == 0
        reason = (r.failed / "crasher" / "error.txt").read_text()
        assert crasher.id in reason and "crasher.jpg" in os.listdir(r.failed / "crasher")
        stop_cleanly(r)
        settle(r, ["one", "slow", "crasher", "long"], kills=4)
    finally:
        r.cleanup()


BAD = 'schema = 1\nkind = "i2v"\nprompt = "bad"\n[video]\nsize = "832*480"\nframes = 5\n[inputs]\nimage = 7\n'


def test_2_4_7_rejections_and_failures_always_say_why(tmp_path: Path) -> None:
    """2: killed between moving a job folder into failed/ and writing error.txt (a bad manifest, and a
    recognised duplicate): the restart writes the real reason there, not "the manifest was removed".
    4: a corrupt JPEG fails after acceptance; killed before and inside the move to failed/: the reason and the
    files end up in failed/<name>/, and `wanbox retry` finds them (not "its input files are gone").
    7: a symlinked job folder and a FIFO manifest each end with a reason, the link's target untouched."""
    r = Root(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "jobdir"
    write_image(elsewhere / "cat.jpg")
    (elsewhere / "job.toml").write_text(manifest_text())
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    try:
        serve_dying_at(r, "reject.moved_folder")
        r.drop("badfolder", BAD, image="x.jpg", folder=True)
        wait_killed(r, "reject.moved_folder")
        assert not (r.failed / "badfolder" / "error.txt").exists()  # the window of failure 2
        serve_dying_at(r, "reject.moved_folder")  # the redo finishes it; the duplicate below dies the same way
        r.drop("dup1", manifest_text(image='"d.jpg"', prompt="dup"), image="d.jpg", folder=True)
        r.wait_state("dup1", "done")
        r.drop("dup2", manifest_text(image='"d.jpg"', prompt="dup"), image="d.jpg", folder=True)
        wait_killed(r, "reject.moved_folder")

        serve_dying_at(r, "fail.intent")
        (r.inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (r.inbox / "broken.toml").write_text(manifest_text(image='"broken.jpg"'))
        wait_killed(r, "fail.intent")
        serve_dying_at(r, None)
        os.symlink(elsewhere, r.inbox / "linked")
        os.mkfifo(r.inbox / "pipe.toml")
        rows = wait_rest(r, ["badfolder", "dup1", "dup2", "broken", "linked", "pipe"])
        for name in ("badfolder", "dup2"):
            row = rows[name]
            assert row.state.value == "rejected" and "removed" not in row.last_error, row.last_error
            assert (r.failed / name / "error.txt").read_text().strip(), name
            assert not (r.failed / f"{name}-2").exists()
        assert "identical to job" in rows["dup2"].last_error and "inputs.image" in rows["badfolder"].last_error
        assert "cannot be decoded" in (r.failed / "broken" / "error.txt").read_text()
        assert sorted(os.listdir(r.failed / "broken")) == ["broken.jpg", "broken.toml", "error.txt"]

        # 7: the link and the FIFO, each with its reason; the target exactly as it was.
        assert "symbolic link to a folder" in rows["linked"].last_error
        assert "symbolic link" in (r.failed / "linked" / "error.txt").read_text()
        assert (r.failed / "linked" / "linked").is_symlink()
        assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
        assert "special file" in rows["pipe"].last_error and (r.failed / "pipe" / "error.txt").exists()
        stop_cleanly(r)

        # 4, continued: retried, it fails again for its real reason, killed inside that move too.
        assert r.cli("retry", rows["broken"].id).returncode == 0
        serve_dying_at(r, "fail.pointer_written")
        wait_killed(r, "fail.pointer_written")
        serve_dying_at(r, None)
        wait_for(lambda: r.state("broken") == "failed" and (r.failed / "broken" / "error.txt").exists(), 30,
                 lambda: r.log_text()[-3000:])  # fmt: skip
        again = r.job("broken")
        assert "cannot be decoded" in again.last_error and "gone" not in again.last_error
        assert sorted(os.listdir(r.failed / "broken")) == ["broken.jpg", "broken.toml", "error.txt"]
        assert not (r.failed / "broken-2").exists()
        stop_cleanly(r)
        assert os.listdir(r.inbox) == []
        settle(r, ["badfolder", "dup1", "dup2", "broken", "linked", "pipe"], kills=4)
    finally:
        r.cleanup()


def test_5_6_flat_rejections_after_the_deadline_take_their_media_and_the_real_reason(tmp_path: Path) -> None:
    """6: a staged job whose image has the wrong sha256, with the daemon down past its deadline: after the
    restart it is rejected for the sha256, not "the file is still changing". 5: killed after its image moved
    to failed/ but before its manifest, then once right after making failed/<name>/: each restart completes
    that same folder (media, manifest and error.txt together; no -2, no temp file, nothing left in the inbox)."""
    r = Root(tmp_path, inbox={"staged_deadline_seconds": 2, "settle_seconds": 0.5})
    wrong = manifest_text(image='{ path = "SHOT.jpg", sha256 = "' + BAD_SHA + '" }')
    try:
        r.serve()
        r.drop("shot", wrong.replace("SHOT", "shot"), image="shot.jpg")
        wait_for(lambda: "sha256" in (getattr(r.job("shot"), "waiting_reason", None) or ""), 20,
                 lambda: r.log_text()[-3000:])  # fmt: skip
        r.stop(signal.SIGKILL)
        time.sleep(2.2)  # past its deadline while the daemon is down
        serve_dying_at(r, "reject.moved_input")
        wait_killed(r, "reject.moved_input")
        assert (r.failed / "shot" / "shot.jpg").exists() and (r.inbox / "shot.toml").exists()  # failure 5's window
        # The restart's redo of "shot" passes failed/shot/ once; the second job's own rejection dies there.
        serve_dying_at(r, "reject.dir_made:2")
        r.drop("second", wrong.replace("SHOT", "second"), image="second.jpg")
        wait_killed(r, "reject.dir_made:2")
        assert sorted(os.listdir(r.failed / "second")) == []  # failure 5's other window
        serve_dying_at(r, None)
        rows = wait_rest(r, ["shot", "second"])
        for name in ("shot", "second"):
            row = rows[name]
            assert row.state.value == "rejected" and "sha256 is" in row.last_error, row.last_error
            assert "still changing" not in row.last_error and "removed" not in row.last_error
            assert sorted(os.listdir(r.failed / name)) == ["error.txt", f"{name}.jpg", f"{name}.toml"]
            assert "sha256" in (r.failed / name / "error.txt").read_text()
        assert sorted(os.listdir(r.failed)) == ["second", "shot"] and os.listdir(r.inbox) == []
        stop_cleanly(r)
        settle(r, ["shot", "second"], kills=3)
    finally:
        r.cleanup()
