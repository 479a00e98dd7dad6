"""Tests of the warm-pool seam: the protocol codec and channel, and the pool manager with real processes.

No mocks: real Unix sockets, real subprocesses speaking the protocol.
"""

from __future__ import annotations

import socket
import threading

import pytest

from daemon import protocol


def test_encode_decode_round_trip_every_message_type() -> None:
    messages = [
        protocol.Hello(model="i2v-A14B", world_size=2, pid=7, devices=[{"name": "cpu"}], parallel={"ulysses": 2}),
        protocol.Ready(load_seconds=1.5),
        protocol.Progress(job="j1", phase="sampling", step=3, total=40),
        protocol.Heartbeat(),
        protocol.Done(job="j1", output="/x/out.mp4", stats={"frames": 5}),
        protocol.Error(job=None, kind="oom", message="out of memory", retryable=True),
        protocol.Run(job="j1", kind="i2v", params={"seed": 1}, inputs={"image": "/w/p.png"}, output="/w/o.mp4"),
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
