"""The supervisor is SIGKILLed with jobs in every non-final state; a restart finishes all of them.

Real `wanbox serve` processes, real SIGKILL, real SQLite; preprocessing is frozen with SIGSTOP to catch
jobs in `preprocessing`/`queued`; `finalizing` (a fraction of a second) is written as a dead daemon leaves it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.outbox import probe_video
from daemon.states import JobState
from tests.jobs import resolved_job
from tests.workers.fake_pool_worker import write_mp4
from tests.workers.harness import Root, alive, manifest_text, wait_for, write_image

pytestmark = pytest.mark.timeout(180)
S = JobState


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def preprocessing_processes(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


def has_loaded(pid: int, library: bytes) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


def craft_interrupted_intake(r: Root) -> str:
    """A staged job whose files were half moved into work/ when the daemon died."""
    with r.ledger() as ledger:
        job = ledger.add_staged("w6", "unknown", r.inbox / "w6.toml", None)
    taken = r.work / job.id / "inbox"
    write_image(taken / "w6.jpg", color=(6, 6, 6))
    (taken / "w6.toml").write_text(manifest_text(image='"w6.jpg"', prompt="interrupted intake"))
    return job.id


def craft_finalizing(r: Root) -> str:
    """A job that was delivering its video when the daemon died (a half-written output in work/)."""
    with r.ledger() as ledger:
        job = ledger.add_staged("f5", "i2v", r.inbox / "f5.toml", None, model_id="i2v-A14B")
        work = r.work / job.id
        image = write_image(work / "inbox" / "f5.jpg", color=(5, 5, 5))
        shutil.copy(image, work / "prepared.png")
        (work / "prepared.json").write_text(json.dumps({"inputs": {"image": str(work / "prepared.png")}}))
        write_mp4(work / "output.mp4", 5, 32, 32, 16)
        (work / "output.mp4").write_bytes((work / "output.mp4").read_bytes()[:100])  # torn
        spec = resolved_job(name="f5", frames=5, fps=16, steps=3, seed=1, inputs={"image": "f5.jpg"})
        spec = spec.with_inputs({"image": replace(spec.inputs["image"], path=image)})
        params = spec.to_dict()
        ledger.transition(
            job.id, S.STAGED, S.QUEUED, "accepted", work_dir=str(work), params_json=params, kind="i2v"
        )
        for frm, to in (
            (S.QUEUED, S.PREPROCESSING),
            (S.PREPROCESSING, S.READY),
            (S.READY, S.SAMPLING),
            (S.SAMPLING, S.FINALIZING),
        ):
            assert ledger.transition(job.id, frm, to, "as the dead daemon left it")
    return job.id


def test_sigkill_in_every_non_final_state_then_restart_finishes_everything(tmp_path: Path) -> None:
    r = Root(tmp_path)
    try:
        # --- kill 1: staged, preprocessing (frozen CPU pool), queued; plus an interrupted intake ---------
        proc = r.serve()
        wait_for(lambda: len(preprocessing_processes(proc.pid)) >= 1, 30, "the CPU pool did not start")
        frozen = preprocessing_processes(proc.pid)
        # frozen only once started (its warm-up imports Pillow): so it has armed its exit with the supervisor
        wait_for(lambda: all(has_loaded(pid, b"PIL") for pid in frozen), 30, "the CPU pool did not warm up")
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        (r.inbox / "s1.toml").write_text(manifest_text(image='"s1.jpg"', prompt="staged"))
        (r.inbox / "gone.toml").write_text(manifest_text(image='"gone.jpg"', prompt="removed while down"))
        r.drop("p1", manifest_text(image='"p1.jpg"', prompt="preprocessing"), image="p1.jpg")
        r.wait_state("p1", "preprocessing")
        r.drop("p2", manifest_text(image='"p2.jpg"', prompt="queued"), image="p2.jpg")
        r.wait_state("p2", "queued")
        r.wait_state("s1", "staged")
        r.wait_state("gone", "staged")
        staged_id = r.job("s1").id
        r.stop(signal.SIGKILL)
        (r.inbox / "gone.toml").unlink()  # its owner took it back while the daemon was down
        # The CPU pool dies with its supervisor, even frozen (it would otherwise wait for tasks forever).
        wait_for(lambda: not any(alive(p) for p in frozen), 10, "the CPU pool outlived its supervisor")
        intake_id = craft_interrupted_intake(r)

        r.serve()
        write_image(r.inbox / "s1.jpg", color=(1, 1, 1))
        for name in ("s1", "p1", "p2", "w6"):
            r.wait_state(name, "done")
        assert r.job("s1").id == staged_id and r.job("w6").id == intake_id
        assert r.job("p1").attempts == 1 and r.job("p2").attempts == 0  # the interrupted attempt counts
        assert "interrupted intake was undone" in r.log_text()
        assert r.state("gone") == "rejected" and "removed from the inbox" in r.job("gone").last_error

        # --- kill 2: sampling (slow steps) and ready (waiting behind it); plus a crafted finalizing ---------
        r.knobs({"k3": {"step_seconds": 0.3}})
        r.drop("k3", manifest_text(image='"k3.jpg"', prompt="sampling", steps=20), image="k3.jpg")
        r.wait_state("k3", "sampling")
        r.drop("k4", manifest_text(image='"k4.jpg"', prompt="ready"), image="k4.jpg")
        r.wait_state("k4", "ready")
        pool_pids = [p for p in r.worker_pids() if alive(p)]
        cpu_pool = preprocessing_processes(r.proc.pid)
        assert cpu_pool, "the CPU pool is not running"
        r.stop(signal.SIGKILL)
        # The orphaned pool notices the dead supervisor at its next message and exits on its own.
        wait_for(lambda: not any(alive(p) for p in pool_pids), 20, "the orphaned pool kept running")
        wait_for(lambda: not any(alive(p) for p in cpu_pool), 10, "the CPU pool outlived its supervisor")
        r.knobs({})
        final_id = craft_finalizing(r)

        r.serve()
        for name in ("k3", "k4", "f5"):
            r.wait_state(name, "done")
        assert r.job("k3").attempts == 1 and r.job("k4").attempts == 0 and r.job("f5").attempts == 1
        assert r.job("f5").id == final_id
        assert r.stop() == 0

        jobs = r.jobs()
        assert sorted(jobs) == ["f5", "gone", "k3", "k4", "p1", "p2", "s1", "w6"]
        with r.ledger() as ledger:
            assert ledger.audit() == []
            assert len(ledger.list(limit=None)) == 8  # no job was recorded twice
            recovered = [
                e.message for e in ledger.events(r.job("k3").id) if "recovered at start-up" in e.message
            ]
            assert recovered and "interrupted in sampling" in recovered[0]
        for name, job in jobs.items():
            if name == "gone":
                continue
            assert probe_video(Path(job.outputs_json["video"])).frames == 5, name
            assert json.loads(Path(job.outputs_json["sidecar"]).read_text())["job_id"] == job.id
        assert sorted(os.listdir(r.inbox)) == []
    finally:
        r.cleanup()
