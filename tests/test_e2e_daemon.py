"""End to end: `python -m daemon.cli serve` as a real process, real uploads, real SQLite, real mp4s.

Only the GPU model is replaced (tests/workers/fake_pool_worker.py, launched by the pool manager).
Scenarios are grouped per daemon run to keep the suite fast on two cores.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from daemon.cli import main as cli_main
from daemon.outbox import probe_video
from tests.workers.harness import Root, alive, manifest_text, wait_for, write_image

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def root(tmp_path: Path):
    made: list[Root] = []

    def make(**sections):
        made.append(Root(tmp_path, **sections))
        return made[-1]

    yield make
    for r in made:
        r.cleanup()


class OutboxWatch:
    """Looks at the outbox every few ms; each final name must be complete the moment it appears."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.seen: dict[str, str] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def check(self, path: Path) -> str:
        if path.suffix == ".mp4":
            return f"{probe_video(path).frames} frames"
        if path.suffix == ".json":
            return json.loads(path.read_text())["job_id"]
        with Image.open(path) as im:
            im.load()
        return "image"

    def run(self) -> None:
        while not self.done.is_set():
            if self.outbox.is_dir():
                for name in os.listdir(self.outbox):
                    if not name.startswith(".") and name not in self.seen:
                        try:
                            self.seen[name] = self.check(self.outbox / name)
                        except Exception as exc:
                            self.seen[name] = f"PARTIAL {exc!r}"
            time.sleep(0.005)

    def stop(self) -> dict[str, str]:
        self.done.set()
        self.thread.join()
        return self.seen


def test_uploads_rsync_sftp_folder_dedupe_and_outage(root) -> None:
    r = root(inbox={"settle_seconds": 0.6})  # 4x the pauses of the slow upload below: safe on a busy machine
    r.serve()
    watch = OutboxWatch(r.outbox)

    # rsync: the file is written under a dotfile name, then renamed. The temporary name is never touched.
    temp = write_image(r.inbox / ".cat.jpg.Xk3j9a")
    temp_manifest = r.inbox / ".cat.toml.a81B2c"
    temp_manifest.write_text(manifest_text())
    time.sleep(1.0)
    assert temp.exists() and temp_manifest.exists() and r.job("cat") is None
    os.rename(temp, r.inbox / "cat.jpg")
    os.rename(temp_manifest, r.inbox / "cat.toml")

    # SFTP: the manifest is there first, the image grows in place past the settle window.
    buffer = io.BytesIO()
    Image.new("RGB", (120, 90), (10, 120, 200)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    (r.inbox / "slow.toml").write_text(manifest_text(image='"slow.jpg"', prompt="slow upload"))
    chunks = [data[i: i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
    with open(r.inbox / "slow.jpg", "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            fh.flush()
            time.sleep(0.15)  # each pause is shorter than the 0.6 s settle window
    last_write = time.time()

    # The folder layout.
    r.drop("fold", manifest_text(prompt="folder job"), folder=True)

    cat = r.wait_state("cat", "done")
    slow = r.wait_state("slow", "done")
    fold = r.wait_state("fold", "done")

    with r.ledger() as ledger:
        accepted = [e for e in ledger.events(slow.id) if e.to_state.value == "queued"][0]
    assert accepted.at.timestamp() >= last_write - 0.05, "the growing file was taken before its upload ended"

    video = Path(cat.outputs_json["video"])
    assert video == r.outbox / "cat.mp4" and probe_video(video).frames == 5
    sidecar = json.loads((r.outbox / "cat.json").read_text())
    assert sidecar["job_id"] == cat.id and sidecar["attempts"] == 1 and isinstance(sidecar["seed"], int)
    assert sidecar["parameters"]["sampling"]["steps"] == 3 and sidecar["model_id"] == "i2v-A14B"
    assert sidecar["inputs"]["image"]["sha256"] and "preprocess" in sidecar["timings_seconds"]
    assert (r.outbox / "cat.jpg").exists() and Path(fold.outputs_json["video"]).name == "fold.mp4"
    assert (r.work / cat.id / "inbox" / "cat.jpg").exists()  # the original input is kept, not deleted
    assert not (r.inbox / "fold").exists() and not (r.inbox / "slow.jpg").exists()

    # An identical resubmission (same manifest content, same image bytes) is recognised.
    r.drop("again", manifest_text())
    again = r.wait_state("again", "rejected")
    assert f"identical to job {cat.id}" in again.last_error and "cat.mp4" in again.last_error
    error_txt = r.failed_reason("again")
    assert f"identical to job {cat.id}" in error_txt and (r.failed / "again" / "again.toml").exists()

    # An unmounted share is an outage, not a deletion: the staged job survives and goes on afterwards.
    (r.inbox / "late.toml").write_text(manifest_text(image='"late.jpg"', prompt="late"))
    r.wait_state("late", "staged")
    away = r.root / "inbox.unmounted"
    os.rename(r.inbox, away)
    wait_for(lambda: "INBOX OUTAGE" in r.log_text(), 10, "no outage logged")
    time.sleep(1.0)
    assert r.state("late") == "staged"
    os.rename(away, r.inbox)
    write_image(r.inbox / "late.jpg", color=(1, 2, 3))
    r.wait_state("late", "done")
    assert "is back after an outage" in r.log_text()

    assert r.stop() == 0
    seen = watch.stop()
    assert not [v for v in seen.values() if v.startswith("PARTIAL")], seen
    assert {"cat.mp4", "cat.json", "cat.jpg", "slow.mp4", "fold.mp4", "late.mp4"} <= set(seen)
    with r.ledger() as ledger:
        assert ledger.audit() == []


def test_bad_manifests_and_escapes_end_in_failed_with_precise_errors(root, tmp_path: Path) -> None:
    from tests.test_manifest_bad import CASES

    r = root(inbox={"settle_seconds": 0.3, "staged_deadline_seconds": 4})
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = outside / "secret.jpg"
    os.mkfifo(fifo)  # reading it would block the daemon forever: it must never be opened
    for index, case in enumerate(CASES):
        (r.inbox / f"bad-{index:02d}.toml").write_text(case[1])
    write_image(r.inbox / "cat.jpg")
    escapes = {
        "dotdot": manifest_text(image='"../outside/secret.jpg"'),
        "absolute": manifest_text(image=f'"{fifo}"'),
        "linked": manifest_text(image='"link.jpg"'),
        "empty": "",
        "binary": None,
        "mismatch": manifest_text(image='{ path = "cat.jpg", sha256 = "' + "0" * 64 + '" }'),
    }
    os.symlink(fifo, r.inbox / "link.jpg")
    for name, text in escapes.items():
        if text is None:
            (r.inbox / f"{name}.toml").write_bytes(b"\xff\xfe\x00garbage")
        else:
            (r.inbox / f"{name}.toml").write_text(text)
    os.symlink(r.inbox / "binary.toml", r.inbox / "symlinked.toml")
    os.mkfifo(r.inbox / "piped.toml")  # a manifest that is a FIFO: opening it would hang the daemon
    with open(r.inbox / "huge.toml", "wb") as fh:  # sparse: 2 GB that must not be read
        fh.truncate(2 * 1024**3)
    r.serve()

    names = [f"bad-{i:02d}" for i in range(len(CASES))] + ["dotdot", "absolute", "linked", "empty", "binary",
                                                           "symlinked", "piped", "huge"]
    wait_for(lambda: all((r.failed / n / "error.txt").exists() for n in names), 60,
             lambda: f"missing: {[n for n in names if not (r.failed / n / 'error.txt').exists()]}\n{r.log_text()[-3000:]}")
    for index, (case_id, _text, field, _value, expected, _line) in enumerate(CASES):
        error_txt = r.failed_reason(f"bad-{index:02d}")
        assert field in error_txt and expected in error_txt, f"{case_id}: {error_txt}"
        assert "wanbox submit" in error_txt  # how to resubmit
        assert (r.failed / f"bad-{index:02d}" / f"bad-{index:02d}.toml").exists()
    assert "inputs.image" in r.failed_reason("dotdot")
    assert '".."' in r.failed_reason("dotdot")
    assert "absolute path" in r.failed_reason("absolute")
    assert "symbolic link" in r.failed_reason("linked")
    assert "UTF-8" in r.failed_reason("binary")
    assert "symbolic link" in r.failed_reason("symlinked")
    assert os.path.islink(r.failed / "symlinked" / "symlinked.toml")  # the link itself was moved
    assert "not a special file" in r.failed_reason("piped")
    assert "2147483648 bytes" in r.failed_reason("huge")
    assert fifo.exists() and not any(r.inbox.glob("bad-*"))

    # The declared hash does not match: staged until the deadline, then rejected saying why.
    assert r.state("mismatch") == "staged"
    mismatch = r.wait_state("mismatch", "rejected", timeout=20)
    assert "sha256" in mismatch.last_error and "0" * 64 in mismatch.last_error
    assert "deadline" in r.failed_reason("mismatch")

    # The daemon stayed up: a good job still goes through.
    write_image(r.inbox / "good.jpg", color=(9, 9, 9))
    (r.inbox / "good.toml").write_text(manifest_text(image='"good.jpg"', prompt="still alive"))
    r.wait_state("good", "done")
    assert r.proc.poll() is None
    assert r.stop() == 0


def test_hung_and_crashing_workers_cancel_retry_and_graceful_stop(root, capsys) -> None:
    r = root(pool={"heartbeat_seconds": 1.5, "stop_grace_seconds": 10})
    r.knobs({"hang": {"hang_at_step": 2}, "crash": {"exit_at_step": 1},
             "long": {"step_seconds": 0.25}, "term": {"step_seconds": 0.25}})
    r.serve()
    r.drop("hang", manifest_text(prompt="hangs", image='"hang.jpg"'), image="hang.jpg")
    hang = r.wait_state("hang", "failed", timeout=60)
    assert "hung: no progress for 1.5 s" in hang.last_error and hang.attempts == 2
    with r.ledger() as ledger:
        messages = [e.message for e in ledger.events(hang.id)]
    assert any("attempt 1 of 2 failed (pool)" in m for m in messages)
    error_txt = r.failed_reason("hang")
    assert "hung" in error_txt and f"wanbox retry {hang.id}" in error_txt
    assert (r.failed / "hang" / "hang.jpg").exists()

    r.drop("crash", manifest_text(prompt="crashes", image='"crash.jpg"'), image="crash.jpg")
    crash = r.wait_state("crash", "failed", timeout=60)
    assert "exited with status 17" in crash.last_error or "closed its connection" in crash.last_error

    pids = r.worker_pids()
    assert len(pids) >= 4  # hang x2 + crash x2 killed, then relaunched
    current = [p for p in pids if alive(p)]
    assert len(current) <= 1, "a killed pool left processes behind"

    # cancel a running job: the pool is told and stops at a step boundary; retry runs it again.
    r.drop("long", manifest_text(prompt="long", steps=40, image='"long.jpg"'), image="long.jpg")
    r.wait_state("long", "sampling")
    assert cli_main(["cancel", r.job("long").id, "--config", str(r.config)]) == 0
    assert "the running pool stops it at the next step" in capsys.readouterr().out
    wait_for(lambda: "the pool stopped it: cancelled at step" in r.log_text(), 15, r.log_text)
    assert r.state("long") == "cancelled"
    r.knobs({"long": {"step_seconds": 0.01}, "term": {"step_seconds": 0.25}})
    assert cli_main(["retry", r.job("long").id, "--config", str(r.config)]) == 0
    r.wait_state("long", "done")

    # retry of a failed job brings its inputs back from failed/ and runs it (now without the hang).
    assert cli_main(["retry", hang.id, "--config", str(r.config)]) == 0
    r.wait_state("hang", "done")
    assert not (r.failed / "hang").exists()

    # SIGTERM: no new work, the running job stops at its step and is requeued; exit 0, nothing left behind.
    r.drop("term", manifest_text(prompt="term", steps=40, image='"term.jpg"'), image="term.jpg")
    r.wait_state("term", "sampling")
    started = time.monotonic()
    assert r.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    term = r.job("term")
    assert term.state.value == "ready" and term.attempts == 0
    assert all(not alive(p) for p in r.worker_pids())
    assert "pool: i2v-A14B stopped (exit status 0)" in r.log_text()  # it exited by itself, cleanly
    with r.ledger() as ledger:
        assert ledger.audit() == []
        assert "requeued" in ledger.events(term.id)[-1].message
