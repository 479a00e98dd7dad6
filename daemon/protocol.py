"""The supervisor <-> warm pool protocol: newline-delimited JSON messages over a Unix socket.

Standard library only (the worker imports it too); it must not import torch, the ledger or anything
that knows about jobs beyond the message shapes.

Each message is one JSON object on one UTF-8 line with a "type". Unknown fields are ignored (kept in
the decoded dict, dropped by `to_message`), so either side may add fields without breaking the other.

worker -> supervisor: hello, ready, progress (also the heartbeat while a job runs), heartbeat, done, error.
supervisor -> worker: run, cancel, shutdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

# A line longer than this is garbage, not a message: never buffer an endless stream in memory.
MAX_LINE_BYTES = 4 * 1024 * 1024

# AF_UNIX paths are limited by sockaddr_un.sun_path (108 bytes on Linux, including the NUL).
MAX_SOCKET_PATH_BYTES = 107

PHASES = ("load", "encode", "sampling", "decode", "write")
ERROR_KINDS = ("oom", "input", "internal", "cancelled", "numerics")  # numerics: a NaN/Inf, step named
JOB_KINDS = ("i2v", "animate")


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


@dataclass(frozen=True)
class Ready:
    type: ClassVar[str] = "ready"
    load_seconds: float


@dataclass(frozen=True)
class Progress:
    type: ClassVar[str] = "progress"
    job: str
    phase: str
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
    kind: str
    message: str
    retryable: bool


# --- messages: supervisor -> worker ------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    type: ClassVar[str] = "run"
    job: str
    kind: str
    params: dict[str, Any]
    inputs: dict[str, str]
    output: str
    crf: int | None = None  # H.264 quality for the output mp4 (daemon config); None = the worker's default
    # Resume from / checkpoint the sampling state: {"dir": folder, "every_steps": n | None,
    # "every_seconds": s | None, "enabled": bool}; absent or None = no checkpoints (see check_resume).
    resume: dict[str, Any] | None = None


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

# Per type: field -> (accepted JSON types, required). bool is excluded from ints on purpose below.
_FIELD_TYPES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {
        "model": ((str,), True),
        "world_size": ((int,), True),
        "pid": ((int,), True),
        "devices": ((list,), False),
        "parallel": ((dict,), False),
    },
    "ready": {"load_seconds": ((int, float), True)},
    "progress": {"job": ((str,), True), "phase": ((str,), True), "step": ((int,), True), "total": ((int,), True)},
    "heartbeat": {},
    "done": {"job": ((str,), True), "output": ((str,), True), "stats": ((dict,), False)},
    "error": {
        "job": ((str, type(None)), True),
        "kind": ((str,), True),
        "message": ((str,), True),
        "retryable": ((bool,), True),
    },
    "run": {
        "job": ((str,), True),
        "kind": ((str,), True),
        "params": ((dict,), True),
        "inputs": ((dict,), True),
        "output": ((str,), True),
        "crf": ((int, type(None)), False),
        "resume": ((dict, type(None)), False),
    },
    "cancel": {"job": ((str,), True)},
    "shutdown": {},
}

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("progress", "phase"): PHASES,
    ("error", "kind"): ERROR_KINDS,
    ("run", "kind"): JOB_KINDS,
}


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "true/false", list: "list", dict: "object"}
    return " or ".join(names.get(t, "null") for t in types)


def _check_field(msg_type: str, name: str, value: Any, types: tuple[type, ...]) -> None:
    # JSON true/false decode to bool, a subclass of int: a step of `true` is garbage, not 1.
    is_bool = isinstance(value, bool)
    ok = isinstance(value, types) and (bool in types or not is_bool)
    if not ok:
        raise ProtocolError(f"{msg_type}.{name}: got {value!r}, expected {_type_name(types)}")
    choices = _CHOICES.get((msg_type, name))
    if choices is not None and value not in choices:
        raise ProtocolError(f"{msg_type}.{name}: got {value!r}, expected one of {', '.join(choices)}")


def validate(obj: Any) -> dict[str, Any]:
    """Check a decoded JSON value against the message shapes; return it unchanged or raise ProtocolError."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"message: got {type(obj).__name__}, expected a JSON object")
    msg_type = obj.get("type")
    if msg_type not in _FIELD_TYPES:
        raise ProtocolError(f"type: got {msg_type!r}, expected one of {', '.join(_FIELD_TYPES)}")
    for name, (types, required) in _FIELD_TYPES[msg_type].items():
        if name not in obj:
            if required:
                raise ProtocolError(f"{msg_type}.{name}: missing, expected {_type_name(types)}")
            continue
        _check_field(msg_type, name, obj[name], types)
    if msg_type == "run" and not all(isinstance(v, str) for v in obj["inputs"].values()):
        raise ProtocolError(f"run.inputs: got {obj['inputs']!r}, expected an object of role -> path strings")
    if msg_type == "run" and obj.get("resume") is not None:
        check_resume(obj["resume"])
    return obj


# --- the run command's optional `resume` field --------------------------------------------------------

_RESUME_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "dir": ((str,), True),  # the job's own folder for its checkpoint (e.g. work/<id>/resume), absolute
    "every_steps": ((int, type(None)), False),  # checkpoint after this many steps ...
    "every_seconds": ((int, float, type(None)), False),  # ... or this many seconds, whichever comes first
    "enabled": ((bool,), False),
}


def check_resume(resume: dict[str, Any]) -> None:
    """ProtocolError unless `resume` is {"dir": absolute path, "every_steps": int >= 1 or null,
    "every_seconds": number > 0 or null, "enabled": bool} (only "dir" required)."""
    for name, (types, required) in _RESUME_FIELDS.items():
        if name not in resume:
            if required:
                raise ProtocolError(f"run.resume.{name}: missing, expected {_type_name(types)}")
            continue
        _check_field("run.resume", name, resume[name], types)
    if not os.path.isabs(resume["dir"]):
        raise ProtocolError(f"run.resume.dir: got {resume['dir']!r}, expected an absolute path")
    steps, seconds = resume.get("every_steps"), resume.get("every_seconds")
    if steps is not None and steps < 1:
        raise ProtocolError(f"run.resume.every_steps: got {steps!r}, expected an integer >= 1 or null")
    if seconds is not None and not 0 < seconds < float("inf"):
        raise ProtocolError(f"run.resume.every_seconds: got {seconds!r}, expected a number > 0 or null")


def encode(msg: Message | dict[str, Any]) -> bytes:
    """One message as one UTF-8 JSON line ending in a newline; validated, so garbage is never sent."""
    if isinstance(msg, dict):
        obj = dict(msg)
    else:
        obj = {"type": msg.type, **asdict(msg)}
    validate(obj)
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
    """A validated dict as its dataclass; unknown fields are dropped."""
    validate(obj)
    cls = MESSAGE_TYPES[obj["type"]]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in obj.items() if k in known})


# --- a blocking line channel over a connected stream socket --------------------------------------


class Channel:
    """Send and receive messages on a connected socket; sends are thread-safe, receives are not."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._send_lock = threading.Lock()

    def send(self, msg: Message | dict[str, Any]) -> None:
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
