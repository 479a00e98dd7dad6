"""The supervisor in-process: model-switch ordering with a real pool, and preprocessing failures.

A real Supervisor object with a real ledger file, real CPU pool processes and the fake worker pool,
driven tick by tick (the subprocess scenarios live in test_e2e_daemon.py and test_supervisor_recovery.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon.config import load_config
from daemon.failures import Failures
from daemon.ledger import Ledger
from daemon.preparation import Preparation, Preparing
from daemon.states import JobState
from daemon.supervisor import Supervisor
from tests.jobs import resolved_job
from tests.workers.harness import Root, manifest_text, write_image

pytestmark = pytest.mark.timeout(120)
S = JobState
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def job(id: str, model: str, minute: int, priority: int = 0, retry_after: datetime | None = None):
    return SimpleNamespace(id=id, model_id=model, created_at=T0 + timedelta(minutes=minute), priority=priority,
                           retry_after=retry_after)


def choose_next(ledger_url: str, ready: list[SimpleNamespace], loaded: str | None, max_wait: float,
                now: datetime, loaded_since: datetime | None = None, fresh: bool = False) -> SimpleNamespace | None:
    """What the supervisor's dispatch picks from these ready jobs: real rows in a new ledger, the ledger's query.

    The peek (which model to load) and the claim (the move to sampling) must agree on it.
    """
    with Ledger.open(ledger_url) as ledger:
        names = {}
        for spec in ready:
            row = ledger.add_staged(spec.id, "i2v", f"inbox/{spec.id}.toml", None, model_id=spec.model_id,
                                    priority=spec.priority, now=spec.created_at)  # fmt: skip
            for frm, to in ((S.STAGED, S.QUEUED), (S.QUEUED, S.PREPROCESSING), (S.PREPROCESSING, S.READY)):
                assert ledger.transition(row.id, frm, to, "to ready", now=spec.created_at)
            if spec.retry_after is not None:  # an attempt failed: it waits for its backoff
                assert ledger.transition(row.id, S.READY, S.SAMPLING, "tried", now=spec.created_at)
                assert ledger.transition(row.id, S.SAMPLING, S.READY, "backing off", retry_after=spec.retry_after,
                                         now=spec.created_at)  # fmt: skip
            names[row.id] = spec
        turn = {"model_id": loaded, "now": now, "max_wait": timedelta(seconds=max_wait),
                "loaded_since": loaded_since, "fresh": fresh}  # what Supervisor.dispatch passes
        peeked = ledger.peek_next(S.READY, **turn)
        claimed = ledger.claim_next(S.READY, S.SAMPLING, **turn)
    assert (peeked and peeked.id) == (claimed and claimed.id), "peek and claim disagree"
    return names[peeked.id] if peeked else None


def test_choose_next_prefers_the_loaded_model_until_another_waited_too_long(new_database) -> None:
    def choose(*args, **kwargs):
        return choose_next(new_database(), *args, **kwargs)

    jobs = [job("a1", "i2v", 0), job("b1", "anim", 1), job("a2", "i2v", 2)]
    now = T0 + timedelta(minutes=10)
    assert choose(jobs, None, 3600, now).id == "a1"  # nothing loaded: oldest first
    assert choose(jobs[1:], "i2v", 3600, now).id == "a2"  # loaded model first, though b1 is older
    assert choose(jobs[1:], "i2v", 60, now).id == "b1"  # b1 waited 9 min > 1 min: its turn
    assert choose(jobs[1:], "anim", 3600, now).id == "b1"
    assert choose([job("a3", "i2v", 5, priority=5), *jobs], "i2v", 3600, now).id == "a3"  # priority
    # Each model holds the pool at most max_wait while others wait: counted from when it was loaded.
    loaded = now - timedelta(seconds=30)
    assert choose(jobs[1:], "i2v", 60, now, loaded_since=loaded).id == "a2"
    assert choose(jobs[1:], "i2v", 20, now, loaded_since=loaded).id == "b1"
    # A freshly loaded pool runs a job of its own model first, even if others are overdue (no ping-pong).
    assert choose(jobs[1:], "i2v", 0, now, loaded_since=now, fresh=True).id == "a2"
    assert choose(jobs[1:], "i2v", 0, now, loaded_since=now - timedelta(seconds=1)).id == "b1"
    assert choose(jobs[1:], "i2v", 0, now, loaded_since=now - timedelta(seconds=1), fresh=True).id == "a2"
    later = now + timedelta(minutes=1)
    assert choose([job("x", "i2v", 0, retry_after=later)], "i2v", 3600, now) is None  # backing off
    assert choose([], "i2v", 3600, now) is None


def make_ready(sup: Supervisor, name: str, model: str, kind: str, minute: int) -> str:
    """A job that went through intake and preprocessing: its prepared image is on disk."""
    ledger = sup.ledger
    created = datetime.now(timezone.utc) - timedelta(minutes=60 - minute)
    row = ledger.add_staged(name, kind, sup.paths.inbox / f"{name}.toml", None, model_id=model, now=created)
    work = sup.paths.work / row.id
    image = write_image(work / "prepared.png", color=(minute, 0, 0))
    (work / "prepared.json").write_text(json.dumps({"inputs": {"image": str(image)}}))
    spec = resolved_job(kind, name=name, frames=5 if kind == "i2v" else None, fps=8, steps=2,
                        size="832*480" if kind == "i2v" else "1280*720")
    ledger.transition(row.id, S.STAGED, S.QUEUED, "accepted", work_dir=str(work), params_json=spec.to_dict(),
                      now=created)
    ledger.transition(row.id, S.QUEUED, S.PREPROCESSING, "prep", now=created)
    ledger.transition(row.id, S.PREPROCESSING, S.READY, "prepared", now=created)
    return row.id


def run_until(sup: Supervisor, done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.tick()
        if done():
            return
    raise AssertionError("timed out")


def sent_order(sup: Supervisor, ids: dict[str, str]) -> list[str]:
    names = {v: k for k, v in ids.items()}
    sent = [(e.at, e.id, names[job_id]) for job_id in ids.values() for e in sup.ledger.events(job_id)
            if e.to_state == S.SAMPLING]
    return [name for _at, _id, name in sorted(sent)]


@pytest.mark.parametrize(("max_wait", "expected"), [(3600, ["a1", "a2", "a3", "b1"]),
                                                    (0, ["a1", "b1", "a2", "a3"])])
def test_model_switch_order_with_a_real_pool(tmp_path: Path, ledger_url: str, max_wait: float,
                                             expected: list[str]) -> None:
    # The production dispatch on either backend: `[paths] ledger` names an SQLite file or a PostgreSQL URL.
    root = Root(tmp_path, pool={"max_switch_wait_seconds": max_wait}, paths={"ledger": ledger_url})
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        ids = {"a1": make_ready(sup, "a1", "i2v-A14B", "i2v", 0),
               "b1": make_ready(sup, "b1", "animate-14B", "animate", 1),
               "a2": make_ready(sup, "a2", "i2v-A14B", "i2v", 2),
               "a3": make_ready(sup, "a3", "i2v-A14B", "i2v", 3)}
        run_until(sup, lambda: all(sup.ledger.get(i).state == S.DONE for i in ids.values()))
        assert sent_order(sup, ids) == expected
        launched = sorted(root.pid_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        models = [p.read_text() for p in launched]
        switches = sum(1 for x, y in zip(models, models[1:], strict=False) if x != y)
        assert switches == (1 if max_wait else 2), models
        assert json.loads((root.outbox / "b1.json").read_text())["model_id"] == "animate-14B"
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_unreadable_image_fails_permanently_with_its_files_in_failed(tmp_path: Path) -> None:
    root = Root(tmp_path)
    (root.inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root.inbox / "broken.toml").write_text(manifest_text(image='"broken.jpg"'))
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: root.state("broken") == "failed")
        failed = root.job("broken")
        assert failed.attempts == 1 and failed.error_kind == "input"  # no retry: same input, same failure
        assert "inputs.image" in failed.last_error and "cannot be decoded" in failed.last_error
        error_txt = (root.failed / "broken" / "error.txt").read_text()
        assert "cannot be decoded" in error_txt and f"wanbox retry {failed.id}" in error_txt
        # the file as the user uploaded it, and what to do: never the daemon's own path of it
        assert "image file 'broken.jpg'" in error_txt and str(root.work) not in error_txt
        assert "upload a corrected file" in error_txt
        assert (root.failed / "broken" / "broken.jpg").read_bytes().startswith(b"\xff\xd8")
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_dedupe_run_runs_an_identical_resubmission_again(tmp_path: Path) -> None:
    root = Root(tmp_path, inbox={"dedupe": "run", "settle_seconds": 0.2})
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        text = manifest_text(sampling="seed = 5")
        root.drop("one", text)
        run_until(sup, lambda: root.state("one") == "done")
        root.drop("two", text)
        run_until(sup, lambda: root.state("two") == "done")
        one, two = root.job("one"), root.job("two")
        assert one.input_hash == two.input_hash and one.id != two.id
        assert two.params_json["sampling"]["seed"] == 5
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_an_output_that_does_not_decode_is_never_delivered(tmp_path: Path) -> None:
    root = Root(tmp_path)
    root.knobs({"garbled": {"bad_output": True}})
    root.drop("garbled", manifest_text())
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: root.state("garbled") == "failed")
        failed = root.job("garbled")
        assert failed.attempts == 2 and "delivery failed" in failed.last_error
        assert "does not decode" in failed.last_error
        assert list(root.outbox.iterdir()) == []  # nothing partial or broken ever reached the outbox
        assert "does not decode" in (root.failed / "garbled" / "error.txt").read_text()
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_preprocessing_progress_reaches_the_ledger(tmp_path: Path) -> None:
    from daemon.preprocessing import ProgressFile, read_progress

    root = Root(tmp_path)
    ledger = Ledger.open(tmp_path / "l.db")
    prep = preparation(root, ledger)
    try:
        row = ledger.add_staged("p", "animate", tmp_path / "p.toml", None)
        work = root.work / row.id
        work.mkdir(parents=True)
        ledger.transition(row.id, S.STAGED, S.QUEUED, "accepted", work_dir=str(work))
        ledger.transition(row.id, S.QUEUED, S.PREPROCESSING, "prep")
        prep.running[row.id] = Preparing(Future(), time.monotonic(), time.monotonic())
        progress = ProgressFile(work)
        progress("detect", 3, 40)
        progress("detect", 4, 40)  # within 0.5 s: skipped
        assert read_progress(work) == {"phase": "detect", "step": 3, "total": 40}
        prep.poll_progress(row.id)
        stored = ledger.get(row.id)
        assert (stored.phase, stored.step, stored.total_steps) == ("preprocess:detect", 3, 40)
        progress("write", 40, 40)  # the last step is always written
        prep.poll_progress(row.id)
        assert ledger.get(row.id).phase == "preprocess:write"
    finally:
        ledger.close()


def test_cancelling_a_staged_job_moves_its_manifest_to_failed(tmp_path: Path) -> None:
    root = Root(tmp_path)
    (root.inbox / "wait.toml").write_text(manifest_text(image='"never.jpg"'))
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: root.state("wait") == "staged")
        time.sleep(0.5)
        sup.tick()
        assert (root.inbox / "wait.toml").exists()  # still waiting for its image
        assert sup.ledger.cancel(root.job("wait").id) == S.STAGED
        run_until(sup, lambda: not (root.inbox / "wait.toml").exists())
        error_txt = (root.failed / "wait" / "error.txt").read_text()
        assert "was cancelled" in error_txt and (root.failed / "wait" / "wait.toml").exists()
        for _ in range(5):
            sup.tick()
        assert len(sup.ledger.list(limit=None)) == 1  # not picked up again as a new job
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_status_and_show_say_why_a_staged_job_waits_and_until_when(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli import main as cli_main

    root = Root(tmp_path)
    (root.inbox / "wait.toml").write_text(manifest_text(image='"nothere.jpg"'))
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: getattr(root.job("wait"), "waiting_reason", None) is not None)
        record = root.job("wait")
        assert record.waiting_reason == "inputs.image = 'nothere.jpg': the file is not in the inbox (yet)"
        deadline = f"{record.staged_deadline:%Y-%m-%d %H:%M:%S} UTC"
        assert cli_main(["status", "--config", str(root.config)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if record.id in line)
        assert "waiting: inputs.image = 'nothere.jpg': the file is not in the inbox (yet)" in row
        assert f"rejected at {deadline}" in row
        assert cli_main(["show", "wait", "--config", str(root.config)]) == 0
        assert "  waiting: inputs.image = 'nothere.jpg'" in capsys.readouterr().out
        assert cli_main(["status", "--json", "--config", str(root.config)]) == 0
        listed = json.loads(capsys.readouterr().out)["jobs"][0]
        assert "the file is not in the inbox" in listed["waiting"] and listed["staged_deadline"] is not None
        write_image(root.inbox / "nothere.jpg")  # the upload arrives: accepted, and no longer waiting
        run_until(sup, lambda: root.state("wait") != "staged")
        assert cli_main(["show", "wait", "--config", str(root.config)]) == 0
        assert "waiting:" not in capsys.readouterr().out
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_an_input_named_by_two_waiting_manifests_is_copied_not_taken(tmp_path: Path) -> None:
    root = Root(tmp_path)
    original = write_image(root.inbox / "shared.jpg").read_bytes()
    (root.inbox / "first.toml").write_text(manifest_text(image='"shared.jpg"', prompt="first"))
    (root.inbox / "second.toml").write_text(manifest_text(image='"shared.jpg"', prompt="second"))
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: root.state("first") == "done" and root.state("second") == "done")
        first, second = root.job("first"), root.job("second")
        for job in (first, second):
            assert (Path(job.work_dir) / "inbox" / "shared.jpg").read_bytes() == original
        assert not (root.inbox / "shared.jpg").exists()  # taken by the last job that needed it
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_a_pool_that_never_starts_fails_its_jobs_with_the_reason(tmp_path: Path) -> None:
    root = Root(tmp_path, pool={"command": ["/nonexistent/wanbox-worker", "--model", "{model}"]})
    root.drop("stuck", manifest_text())
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: root.state("stuck") == "failed")
        why = root.job("stuck").last_error
        assert "failed to start 2 times in a row" in why and "could not be started" in why
        assert "wanbox doctor" in why
        assert (root.failed / "stuck" / "cat.jpg").exists()
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_a_failed_job_does_not_block_its_identical_resubmission(tmp_path: Path) -> None:
    root = Root(tmp_path)
    root.knobs({"first": {"error": "input"}})  # the worker refuses it: a permanent failure
    text = manifest_text(sampling="seed = 9")
    root.drop("first", text)
    sup = Supervisor(load_config(root.config))
    sup.start()
    try:
        run_until(sup, lambda: root.state("first") == "failed")
        assert root.job("first").attempts == 1 and "injected input error" in root.job("first").last_error
        root.drop("second", text)
        run_until(sup, lambda: root.state("second") == "done")
        assert root.job("second").input_hash == root.job("first").input_hash
        root.drop("third", text)  # identical to a done job: recognised
        run_until(sup, lambda: root.state("third") == "rejected")
        assert f"identical to job {root.job('second').id} (done)" in root.job("third").last_error
    finally:
        sup.stopping.set()
        sup.shutdown()
        root.cleanup()


def test_one_supervisor_per_root(tmp_path: Path) -> None:
    from daemon.supervisor import AlreadyRunning

    root = Root(tmp_path)
    first = Supervisor(load_config(root.config))
    first.start()
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            Supervisor(load_config(root.config)).start()
        assert root.socket.exists()  # the refused one did not touch the running one's socket
    finally:
        first.stopping.set()
        first.shutdown()
    again = Supervisor(load_config(root.config))
    again.start()  # released on shutdown
    again.stopping.set()
    again.shutdown()
    root.cleanup()


def test_a_stalled_preparation_fails_its_attempt_and_the_one_beside_it_goes_back_in_line(tmp_path: Path) -> None:
    from tests.workers.harness import alive

    root = Root(tmp_path, preprocess={"workers": 2, "stall_seconds": 3})
    ledger = Ledger.open(tmp_path / "l.db")
    prep = preparation(root, ledger)
    prep.start()
    try:
        ids = {}
        for name in ("stuck", "busy"):
            row = ledger.add_staged(name, "i2v", tmp_path / f"{name}.toml", None)
            ledger.transition(row.id, S.STAGED, S.QUEUED, "accepted", work_dir=str(root.work / row.id))
            ledger.transition(row.id, S.QUEUED, S.PREPROCESSING, "prep")
            now = time.monotonic()  # real busy processes
            prep.running[row.id] = Preparing(prep.pool.submit(time.sleep, 60), now, now)
            ids[name] = row.id
        old = prep.pool
        wait_until = time.monotonic() + 30
        while len(old.pids()) < 2 and time.monotonic() < wait_until:
            time.sleep(0.1)
        processes = old.pids()
        prep.running[ids["stuck"]].moved = time.monotonic() - 10  # no progress for 10 s > 3 s
        prep.running[ids["busy"]].moved = time.monotonic()
        prep.collect()
        stuck, busy = ledger.get(ids["stuck"]), ledger.get(ids["busy"])
        assert stuck.state == S.QUEUED and stuck.attempts == 1 and stuck.retry_after is not None  # retried later
        assert "preprocessing made no progress for 3 s" in stuck.last_error, stuck.last_error
        assert busy.state == S.QUEUED and busy.attempts == 0 and not busy.last_error  # not its fault: no attempt
        assert prep.running == {} and prep.pool is not old
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes) == 2 and not any(alive(pid) for pid in processes), "the stuck CPU pool was not killed"
        assert prep.pool.submit(sum, [1, 2]).result(timeout=30) == 3  # the new CPU pool works
    finally:
        prep.pool.kill()
        ledger.close()


def preparation(root: Root, ledger: Ledger) -> Preparation:
    cfg = load_config(root.config)
    return Preparation(cfg, ledger, Failures(ledger, cfg.paths.work, cfg.paths.failed), threading.Event())
