"""Tests of the warm-pool seam: the protocol codec and channel, and the pool manager with real processes.

No mocks: real Unix sockets, real subprocesses speaking the protocol.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import protocol
from daemon.config import PoolSettings
from daemon.outbox import probe_video
from daemon.pool import WarmPool
from tests.jobs import resolved_job
from tests.workers.harness import FAKE_WORKER, alive, short_socket_dir


def test_encode_decode_round_trip_every_message_type() -> None:
    messages = [
        protocol.Hello(model="i2v-A14B", world_size=2, pid=7, devices=[{"name": "cpu"}], parallel={"ulysses": 2}),
        protocol.Ready(load_seconds=1.5),
        protocol.Progress(job="j1", phase="sampling", step=3, total=40),
        protocol.Heartbeat(),
        protocol.Done(job="j1", output="/x/out.mp4", stats={"frames": 5}),
        protocol.Error(job=None, kind="oom", message="out of memory", retryable=True),
        protocol.Run(job="j1", kind="i2v", params=resolved_job(seed=1), inputs={"image": "/w/p.png"},
                     output="/w/o.mp4"),
        protocol.Cancel(job="j1"),
        protocol.Shutdown(),
    ]
    for msg in messages:
        line = protocol.encode(msg)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        obj = protocol.decode(line)
        assert obj["type"] == msg.type
        assert protocol.to_message(obj) == msg


def test_unknown_fields_are_kept_in_dict_and_dropped_by_to_message() -> None:
    obj = protocol.decode(b'{"type":"cancel","job":"a","future":1}\n')
    assert obj["future"] == 1
    assert protocol.to_message(obj) == protocol.Cancel(job="a")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"", "empty line"),
        (b"not json", "not JSON"),
        (b"[1,2]", "expected a JSON object"),
        (b'{"job":"a"}', "type: got None"),
        (b'{"type":"bogus"}', "type: got 'bogus'"),
        (b'{"type":"progress","job":"a","phase":"sampling","step":true,"total":4}', "progress.step"),
        (b'{"type":"progress","job":"a","phase":"dreaming","step":1,"total":4}', "progress.phase"),
        (b'{"type":"progress","job":"a","phase":"sampling","total":4}', "progress.step: missing"),
        (b'{"type":"error","job":"a","kind":"oom","message":"m","retryable":1}', "error.retryable"),
        (b'{"type":"run","job":"a","kind":"t2v","params":{},"inputs":{},"output":"o"}', "run.kind"),
        (b'{"type":"run","job":"a","kind":"i2v","params":{},"inputs":{"image":3},"output":"o"}', "run.inputs"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_decode_rejects_garbage_naming_the_field(line: bytes, needle: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=None) as info:
        protocol.decode(line)
    assert needle in str(info.value)


def test_encode_refuses_invalid_message() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"type": "progress", "job": "a"})


def test_channel_over_real_unix_socket_splits_lines_and_reports_eof(tmp_path) -> None:
    server = protocol.listen(tmp_path / "s.sock")
    got: list[object] = []

    def worker() -> None:
        with protocol.connect(tmp_path / "s.sock", timeout=5) as chan:
            chan.send(protocol.Hello(model="m", world_size=1, pid=1))
            # two messages in one write, then a message split over two writes
            chan.sock.sendall(protocol.encode(protocol.Ready(load_seconds=0.1)) + b'{"type":"heart')
            chan.sock.sendall(b'beat"}\n')
            got.append(chan.recv(timeout=5))

    thread = threading.Thread(target=worker)
    thread.start()
    conn, _ = server.accept()
    chan = protocol.Channel(conn)
    assert chan.recv(timeout=5)["type"] == "hello"
    assert chan.recv(timeout=5)["type"] == "ready"
    assert chan.recv(timeout=5)["type"] == "heartbeat"
    chan.send(protocol.Shutdown())
    thread.join(5)
    assert got == [{"type": "shutdown"}]
    assert chan.recv(timeout=5) is None  # worker closed: EOF
    with pytest.raises(TimeoutError):
        a, b = socket.socketpair()
        protocol.Channel(a).recv(timeout=0.1)
    server.close()


def test_socket_path_limits_and_refusal_to_replace_a_regular_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="AF_UNIX"):
        protocol.check_socket_path("/" + "x" * 200)
    regular = tmp_path / "not-a-socket"
    regular.write_text("data")
    with pytest.raises(FileExistsError):
        protocol.listen(regular)
    assert regular.read_text() == "data"


def test_channel_poll_is_non_blocking_and_reports_eof() -> None:
    a, b = socket.socketpair()
    left, right = protocol.Channel(a), protocol.Channel(b)
    assert left.poll() is None
    right.send(protocol.Cancel(job="j"))
    assert left.poll() == {"type": "cancel", "job": "j"}
    right.close()
    with pytest.raises(EOFError):
        left.poll()


# --- the pool manager with the real protocol-speaking test worker ---------------------------------


FAKE_COMMAND = ("{python}", str(FAKE_WORKER), "--model", "{model}", "--socket", "{socket}")


def make_pool(tmp_path: Path, knobs: dict | None = None, **settings: object) -> WarmPool:
    (tmp_path / "knobs.json").write_text(json.dumps(knobs or {}))
    base = PoolSettings(command=FAKE_COMMAND, device="cpu", heartbeat_seconds=2, load_deadline_seconds=15,
                        relaunch_base_seconds=0.5, stop_grace_seconds=3,
                        env={"FAKE_WORKER_KNOBS": str(tmp_path / "knobs.json"),
                             "FAKE_WORKER_PID_DIR": str(tmp_path / "pids")})
    return WarmPool(replace(base, **settings), short_socket_dir() / "pool.sock")


def events_until(pool: WarmPool, kinds: set[str], timeout: float = 20) -> list:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in pool.poll(timeout=0.1):
            seen.append(event)
            if event.kind in kinds:
                return seen
    raise AssertionError(f"no {kinds} within {timeout} s; saw {[(e.kind, e.reason) for e in seen]}")


def run_msg(tmp_path: Path, job: str, name: str, steps: int = 3) -> protocol.Run:
    return protocol.Run(job=job, kind="i2v", params=resolved_job(name=name, frames=5, fps=8, steps=steps),
                        inputs={}, output=str(tmp_path / f"{job}.mp4"))


def worker_pids(tmp_path: Path) -> list[int]:
    return [int(p.name) for p in (tmp_path / "pids").iterdir()]


def test_pool_runs_two_jobs_on_one_warm_process_with_progress(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    try:
        pool.launch("i2v-A14B")
        assert pool.command("i2v-A14B")[0] == sys.executable
        events_until(pool, {"ready"})
        assert pool.state == "idle" and pool.hello.model == "i2v-A14B"
        first_pid = pool.pid
        for job in ("J1", "J2"):
            assert pool.run(run_msg(tmp_path, job, job))
            seen = events_until(pool, {"done"})
            steps = [e.message.step for e in seen if e.kind == "progress" and e.message.phase == "sampling"]
            assert steps == [1, 2, 3]
            done = seen[-1]
            assert done.job == job and probe_video(Path(done.message.output)).frames == 5
        assert pool.pid == first_pid and pool.state == "idle"  # no relaunch between jobs
    finally:
        pool.close()
    assert not alive(first_pid)


def test_hung_worker_is_detected_and_its_process_group_killed(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, {"stuck": {"hang_at_step": 2}})
    try:
        pool.launch("i2v-A14B")
        events_until(pool, {"ready"})
        pid = pool.pid
        started = time.monotonic()
        pool.run(run_msg(tmp_path, "J1", "stuck", steps=4))
        died = events_until(pool, {"died"})[-1]
        assert died.job == "J1" and "hung: no progress for 2 s" in died.reason and "sampling step 1/4" in died.reason
        assert 2 <= time.monotonic() - started < 12
        assert pool.state == "stopped" and not alive(pid)
        assert all(not alive(p) for p in worker_pids(tmp_path))
        assert not pool.can_launch()  # backoff before the relaunch
        time.sleep(0.6)
        assert pool.can_launch()
        pool.launch("i2v-A14B")
        events_until(pool, {"ready"})
        pool.run(run_msg(tmp_path, "J2", "fine"))
        assert events_until(pool, {"done"})[-1].job == "J2"
    finally:
        pool.close()


def test_worker_death_mid_job_is_reported_with_exit_status(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, {"crash": {"exit_at_step": 2}})
    try:
        pool.launch("i2v-A14B")
        events_until(pool, {"ready"})
        pool.run(run_msg(tmp_path, "J1", "crash"))
        died = events_until(pool, {"died"})[-1]
        assert died.job == "J1"
        assert "exited with status 17" in died.reason or "closed its connection" in died.reason
        assert pool.failures == 1
    finally:
        pool.close()


def test_cancel_reaches_the_worker_at_a_step_boundary(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, {"*": {"step_seconds": 0.3}})
    try:
        pool.launch("i2v-A14B")
        events_until(pool, {"ready"})
        pool.run(run_msg(tmp_path, "J1", "long", steps=50))
        events_until(pool, {"progress"})
        pool.cancel("J1")
        error = events_until(pool, {"error"}, timeout=10)[-1]
        assert error.job == "J1" and error.message.kind == "cancelled"
        assert pool.state == "idle"
    finally:
        pool.close()


def test_pool_that_never_becomes_ready_is_killed_at_the_load_deadline(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, {"*": {"hang_on_load": 1}}, load_deadline_seconds=1.5)
    try:
        pool.launch("animate-14B")
        died = events_until(pool, {"died"})[-1]
        assert died.job is None and "did not become ready within 1.5 s" in died.reason
        assert all(not alive(p) for p in worker_pids(tmp_path))
    finally:
        pool.close()


def test_command_placeholders_and_nccl_safety_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # an operator's explicit choice is kept
    pool = make_pool(tmp_path, command=("torchrun", "--nproc-per-node", "{nproc}", "--ckpt", "{checkpoint_dir}",
                                        "{crf}"), nproc=4, gpus="0,1,2,3")
    assert pool.command("i2v-A14B")[:3] == ["torchrun", "--nproc-per-node", "4"]
    assert pool.command("i2v-A14B")[4].endswith("Wan2.2-I2V-A14B") and pool.command("x")[-1] == "18"
    env = pool.environment()
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NCCL_NVLS_ENABLE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    bad = make_pool(tmp_path, command=("worker", "{modle}"))
    with pytest.raises(ValueError, match="bad placeholder 'modle'"):
        bad.command("i2v-A14B")


@pytest.mark.slow
def test_fake_worker_under_real_torchrun_with_two_gloo_ranks(tmp_path: Path) -> None:
    torchrun = ("{python}", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "{nproc}",
                str(FAKE_WORKER), "--model", "{model}", "--socket", "{socket}")
    pool = make_pool(tmp_path, command=torchrun, nproc=2, load_deadline_seconds=60)
    try:
        pool.launch("i2v-A14B")
        events_until(pool, {"ready"}, timeout=60)
        assert pool.hello.world_size == 2
        pool.run(run_msg(tmp_path, "J1", "dist"))
        done = events_until(pool, {"done"})[-1]
        assert done.message.stats["peak_memory"] == [0, 0]
        assert probe_video(Path(done.message.output)).frames == 5
        assert len(worker_pids(tmp_path)) == 2
    finally:
        pool.close()
    assert all(not alive(p) for p in worker_pids(tmp_path))


def test_a_worker_command_that_cannot_start_is_a_death_not_a_crash(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, command=("/nonexistent/wanbox-worker", "--model", "{model}"))
    try:
        events = pool.launch("i2v-A14B")
        assert [e.kind for e in events] == ["died"]
        assert "could not be started" in events[0].reason and "/nonexistent/wanbox-worker" in events[0].reason
        assert pool.state == "stopped" and pool.failures == 1
    finally:
        pool.close()


def test_max_area_and_threads_are_settings_passed_to_the_worker(tmp_path: Path) -> None:
    """[pool] max_area becomes the worker's --max-area (after the command, also a custom one) and [pool] threads
    its OMP_NUM_THREADS, which torch sizes its intra-op pool from; unset, neither is passed."""
    plain = make_pool(tmp_path)
    assert "--max-area" not in plain.command("i2v-A14B")
    assert plain.environment().get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")
    capped = make_pool(tmp_path, max_area=4096, threads=3, env={"OMP_NUM_THREADS": "8", "X": "1"})
    argv = capped.command("i2v-A14B")
    assert argv[:2] == [sys.executable, str(FAKE_WORKER)] and argv[-2:] == ["--max-area", "4096"]
    env = capped.environment()
    assert env["OMP_NUM_THREADS"] == "3" and env["X"] == "1"  # the setting wins over a [pool.env] copy


def test_runtime_comes_from_the_workers_hello() -> None:
    pool = WarmPool(PoolSettings(), Path("/nonexistent/pool.sock"))
    assert pool.runtime == {}
    pool.hello = protocol.Hello(model="i2v-A14B", world_size=1, pid=1,
                                runtime={"torch": "2.13.0", "cuda": "13.0", "threads": 4, "max_area": None})
    assert pool.runtime == {"torch": "2.13.0", "cuda": "13.0", "threads": 4, "max_area": None}
