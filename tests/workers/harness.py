"""Test harness: a throwaway daemon root, its config, real daemon subprocesses and ledger look-ups.

Everything is real (files, SQLite, processes); only the GPU model is replaced by fake_pool_worker.py, unless a
test asks for the real worker on tiny models (`real_pool`).
It must not be imported by the daemon itself.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from daemon.config import DEFAULT_WORKER_COMMAND

REPO = Path(__file__).resolve().parents[2]
FAKE_WORKER = Path(__file__).resolve().parent / "fake_pool_worker.py"

I2V_MANIFEST = """schema = 1
kind = "i2v"
prompt = "{prompt}"
{extra}
[video]
size = "832*480"
frames = {frames}

[sampling]
steps = {steps}
{sampling}
[inputs]
image = {image}
"""


def manifest_text(image: str = '"cat.jpg"', prompt: str = "a cat", frames: int = 5, steps: int = 3,
                  extra: str = "", sampling: str = "") -> str:
    return I2V_MANIFEST.format(image=image, prompt=prompt, frames=frames, steps=steps, extra=extra,
                               sampling=sampling)


def write_image(path: Path, size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 80, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def write_tiny_checkpoint(dest: Path, family: str, *extra: str) -> Path:
    """A tiny checkpoint in the released layout, written by the CLI users run (`python -m pipeline.weights.tiny`)."""
    subprocess.run([sys.executable, "-m", "pipeline.weights.tiny", str(dest), "--family", family, *extra],
                   cwd=REPO, check=True, capture_output=True)
    return dest


def real_pool(model: str, ckpt: Path, nproc: int, *worker_args: str, max_area: int = 0) -> dict:
    """The default worker command on the CPU: the area cap and one thread per rank are settings, not flags."""
    return {"command": [*DEFAULT_WORKER_COMMAND, *worker_args], "nproc": nproc, "checkpoint_dirs": {model: str(ckpt)},
            "env": {}, "threads": 1, "max_area": max_area, "heartbeat_seconds": 90, "load_deadline_seconds": 240,
            "stop_grace_seconds": 30}


def short_socket_dir() -> Path:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp paths can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="wbx-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


class Root:
    """A daemon root under tmp_path with a fast test config; `serve()` starts a real daemon process."""

    def __init__(self, tmp: Path, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.inbox = self.root / "inbox"
        self.outbox = self.root / "outbox"
        self.failed = self.root / "failed"
        self.work = self.root / "work"
        self.knobs_file = tmp / "knobs.json"
        self.pid_dir = tmp / "worker-pids"
        self.log = tmp / "daemon.log"
        self.socket = short_socket_dir() / "pool.sock"
        self.inbox.mkdir(parents=True, exist_ok=True)
        config: dict[str, dict[str, Any]] = {
            "paths": {"root": str(self.root), "socket": str(self.socket)},
            "inbox": {"settle_seconds": 0.3, "rescan_seconds": 0.5, "staged_deadline_seconds": 30},
            "jobs": {"tick_seconds": 0.05, "max_attempts": 2, "backoff_base_seconds": 0.1,
                     "backoff_cap_seconds": 0.3},
            "pool": {"device": "cpu", "heartbeat_seconds": 3, "load_deadline_seconds": 20,
                     "relaunch_base_seconds": 0.1, "relaunch_cap_seconds": 0.5, "stop_grace_seconds": 5,
                     "command": ["{python}", str(FAKE_WORKER), "--model", "{model}", "--socket", "{socket}"],
                     "env": {"FAKE_WORKER_KNOBS": str(self.knobs_file), "FAKE_WORKER_PID_DIR": str(self.pid_dir)}},
            "preprocess": {"workers": 1},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        self.config = tmp / "config.toml"
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"
            for name, values in config.items()
        ))
        self.proc: subprocess.Popen[bytes] | None = None
        self._ledger: Any = None

    # --- inputs ------------------------------------------------------------------------------------

    def knobs(self, table: dict[str, dict[str, Any]]) -> None:
        self.knobs_file.write_text(json.dumps(table))

    def drop(self, name: str, text: str, image: str | None = "cat.jpg", folder: bool = False) -> Path:
        """Upload like a careful user: image first, manifest last, each via a dotfile + rename."""
        base = self.inbox / name if folder else self.inbox
        base.mkdir(parents=True, exist_ok=True) if folder else None
        if image is not None and not (base / image).exists():
            temp = write_image(base / f".{image}.{secrets.token_hex(3)}")
            os.rename(temp, base / image)
        manifest = base / ("job.toml" if folder else f"{name}.toml")
        temp = base / f".{manifest.name}.{secrets.token_hex(3)}"
        temp.write_text(text)
        os.rename(temp, manifest)
        return manifest

    # --- the daemon --------------------------------------------------------------------------------

    def serve(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--config", str(self.config)],
                                         cwd=REPO, env=env, stdout=log, stderr=log)
        return self.proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--config", str(self.config)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    # --- the ledger ----------------------------------------------------------------------------------

    def ledger(self) -> Any:
        """The root's ledger, opened once (opening runs the migration check: too slow to poll with)."""
        from daemon.ledger import Ledger

        if self._ledger is None:
            self._ledger = Ledger.open(self.root / "state" / "wanbox.db")
        return contextlib.nullcontext(self._ledger)

    def jobs(self) -> dict[str, Any]:
        """name -> newest job row (several jobs may share a name: the newest wins)."""
        if not (self.root / "state" / "wanbox.db").exists():
            return {}
        with self.ledger() as ledger:
            return {job.name: job for job in ledger.list(limit=None, newest_first=False)}

    def job(self, name: str) -> Any | None:
        return self.jobs().get(name)

    def state(self, name: str) -> str | None:
        job = self.job(name)
        return job.state.value if job else None

    def wait_state(self, name: str, states: str | tuple[str, ...], timeout: float = 40) -> Any:
        wanted = (states,) if isinstance(states, str) else states
        wait_for(lambda: self.state(name) in wanted, timeout,
                 lambda: f"job {name!r} is {self.state(name)!r}, expected {wanted}\n--- log ---\n{self.log_text()[-4000:]}")
        return self.job(name)

    def failed_reason(self, folder: str, timeout: float = 15) -> str:
        """failed/<folder>/error.txt once it is there: the ledger records a failure first and its files move
        right after (an intent makes that move exactly once), so a test that saw the state waits for them."""
        reason = self.failed / folder / "error.txt"
        wait_for(reason.exists, timeout, lambda: f"no {reason}\n--- log ---\n{self.log_text()[-4000:]}")
        return reason.read_text()

    def worker_pids(self) -> list[int]:
        return [int(p.name) for p in self.pid_dir.iterdir()] if self.pid_dir.exists() else []

    def cleanup(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.worker_pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, message: Callable[[], str] | str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(message() if callable(message) else message or "timed out")
