"""The supervisor <-> warm pool protocol: newline-delimited JSON messages over a Unix socket.

Pure Python (the worker imports it too): the message dataclasses, their JSON lines and a channel. A `run` carries
the resolved job (inbox_schema.Job), checked field by field on both ends. It must not import torch or the ledger.

Each message is one JSON object on one UTF-8 line with a "type". Unknown fields are ignored (kept in the decoded
dict, dropped by `to_message`), so either side may add fields without breaking the other.

worker -> supervisor: hello, ready, progress (also the heartbeat while a job runs), heartbeat, done, error.
supervisor -> worker: run, cancel, shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from daemon.states import ErrorKind, Phase
from inbox_schema import Job, JobDataError, codec, kinds

# A line longer than this is garbage, not a message: never buffer an endless stream in memory.
MAX_LINE_BYTES = 4 * 1024 * 1024

# AF_UNIX paths are limited by sockaddr_un.sun_path (108 bytes on Linux, including the NUL).
MAX_SOCKET_PATH_BYTES = 107


class ProtocolError(ValueError):
    """A line that is not a valid protocol message; says what was wrong and with which field."""


# --- messages: worker -> supervisor ------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    type: ClassVar[str] = "hello"
    model: str
    world_size: int
    pid: int
    devices: list[dict[str, Any]] = field(default_factory=list)
    parallel: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)  # torch and CUDA versions, threads, area cap


@dataclass(frozen=True)
class Ready:
    type: ClassVar[str] = "ready"
    load_seconds: float


@dataclass(frozen=True)
class Progress:
    type: ClassVar[str] = "progress"
    job: str
    phase: Phase
    step: int
    total: int


@dataclass(frozen=True)
class Heartbeat:
    type: ClassVar[str] = "heartbeat"


@dataclass(frozen=True)
class Done:
    type: ClassVar[str] = "done"
    job: str
    output: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    job: str | None
    kind: ErrorKind
    message: str
    retryable: bool


# --- messages: supervisor -> worker ------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """A run's sampling checkpoints: resume from the one in `dir` (the job's own folder) and write one there
    after `every_steps` steps or `every_seconds` seconds, whichever comes first (None: not by that measure)."""

    dir: str
    every_steps: int | None = None
    every_seconds: float | None = 120.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if not os.path.isabs(self.dir):
            raise ProtocolError(f"run.resume.dir: got {self.dir!r}, expected an absolute path")
        if self.every_steps is not None and self.every_steps < 1:
            raise ProtocolError(f"run.resume.every_steps: got {self.every_steps!r}, expected an integer >= 1 or null")
        if self.every_seconds is not None and not 0 < self.every_seconds < float("inf"):
            raise ProtocolError(f"run.resume.every_seconds: got {self.every_seconds!r}, expected a number > 0 "
                                "or null")


@dataclass(frozen=True)
class Run:
    """One job for the pool: `params` is the resolved job, `inputs` the prepared files by role."""

    type: ClassVar[str] = "run"
    job: str
    kind: str
    inputs: dict[str, str]
    output: str
    params: Job
    crf: int | None = None  # H.264 quality for the output mp4 (daemon config); None = the worker's default
    resume: Resume | None = None  # sampling checkpoints: None = none written, none read


@dataclass(frozen=True)
class Cancel:
    type: ClassVar[str] = "cancel"
    job: str


@dataclass(frozen=True)
class Shutdown:
    type: ClassVar[str] = "shutdown"


Message = Hello | Ready | Progress | Heartbeat | Done | Error | Run | Cancel | Shutdown

MESSAGE_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Hello, Ready, Progress, Heartbeat, Done, Error, Run, Cancel, Shutdown)
}


def _known_fields(obj: dict[str, Any]) -> dict[str, Any]:
    cls = MESSAGE_TYPES[obj["type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def _checked(obj: Any) -> Message:
    """The message a decoded JSON value is, or ProtocolError naming the first wrong field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"message: got {type(obj).__name__}, expected a JSON object")
    msg_type = obj.get("type")
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"type: got {msg_type!r}, expected one of {', '.join(MESSAGE_TYPES)}")
    if msg_type == "run" and obj.get("kind") not in kinds():
        raise ProtocolError(f"run.kind: got {obj.get('kind')!r}, expected one of {', '.join(kinds())}")
    try:
        msg = codec.read(MESSAGE_TYPES[msg_type], _known_fields(obj), msg_type)
    except JobDataError as exc:
        raise ProtocolError(str(exc)) from None
    if isinstance(msg, Run) and msg.params.kind != msg.kind:
        raise ProtocolError(f"run.kind: got {msg.kind!r}, but run.params is a {msg.params.kind!r} job")
    return msg


def validate(obj: Any) -> dict[str, Any]:
    """Check a decoded JSON value against the message shapes; return it unchanged or raise ProtocolError."""
    _checked(obj)
    return obj


def encode(msg: Message) -> bytes:
    """One message as one UTF-8 JSON line ending in a newline; checked, so garbage is never sent."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise ProtocolError(f"message: got {type(msg).__name__}, expected one of the protocol's message classes")
    obj = {"type": msg.type, **{f.name: codec.write(getattr(msg, f.name)) for f in dataclasses.fields(msg)}}
    _checked(obj)
    # ensure_ascii keeps the line pure ASCII (no raw newline can appear inside a string either way).
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse and validate one line (with or without its newline); ProtocolError on anything else."""
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"line is not UTF-8: {exc}") from None
    else:
        text = line
    text = text.strip()
    if not text:
        raise ProtocolError("empty line, expected a JSON object")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON ({exc.msg} at column {exc.colno}): {text[:80]!r}") from None
    return validate(obj)


def to_message(obj: dict[str, Any]) -> Message:
    """A decoded dict as its dataclass (the job of a `run` as an inbox_schema.Job); unknown fields are dropped."""
    return _checked(obj)


# --- a blocking line channel over a connected stream socket --------------------------------------


class Channel:
    """Send and receive messages on a connected socket; sends are thread-safe, receives are not."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._send_lock = threading.Lock()

    def send(self, msg: Message) -> None:
        data = encode(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Next message; None when the peer closed; TimeoutError if nothing complete came in `timeout` s."""
        line = self.recv_line(timeout)
        return None if line is None else decode(line)

    def recv_line(self, timeout: float | None = None) -> bytes | None:
        """Next raw line without its newline; None at EOF; timeout 0 = one non-blocking read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE_BYTES:
                raise ProtocolError(f"line longer than {MAX_LINE_BYTES} bytes without a newline")
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                raise TimeoutError(f"no complete message within {timeout} s") from None
            if not chunk:
                return None  # a half line at EOF is a dead peer, not a message
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def poll(self) -> dict[str, Any] | None:
        """A message if one is already waiting, else None; EOFError when the peer has closed.

        For a worker between denoising steps: check for a `cancel` without blocking.
        """
        try:
            msg = self.recv(timeout=0.0)
        except TimeoutError:
            return None
        if msg is None:
            raise EOFError("the supervisor closed the connection")
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_socket_path(path: str | os.PathLike[str]) -> str:
    """The path as a string, or ValueError if it is too long for AF_UNIX (the kernel would truncate it)."""
    text = os.fspath(path)
    if len(os.fsencode(text)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path {text!r} is {len(os.fsencode(text))} bytes, expected at most "
            f"{MAX_SOCKET_PATH_BYTES} (AF_UNIX limit): choose a shorter state dir or socket path"
        )
    return text


def connect(path: str | os.PathLike[str], timeout: float = 30.0) -> Channel:
    """Connect to the supervisor's socket, retrying while it does not exist yet (worker side)."""
    target = check_socket_path(path)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(target)
            sock.settimeout(None)
            return Channel(sock)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise ConnectionError(f"could not connect to {target} within {timeout} s") from None
            time.sleep(0.05)


def listen(path: str | os.PathLike[str], backlog: int = 4) -> socket.socket:
    """A listening Unix socket at `path` (a stale socket file left by a dead supervisor is replaced)."""
    target = check_socket_path(path)
    if os.path.lexists(target):
        if not stat.S_ISSOCK(os.lstat(target).st_mode):
            raise FileExistsError(f"{target} exists and is not a socket: refusing to replace it")
        os.unlink(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(target)
    os.chmod(target, 0o600)  # only the daemon's user may drive the GPUs
    sock.listen(backlog)
    return sock
