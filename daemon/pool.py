"""The warm pool manager: launches the worker command in its own session and talks to its rank 0.

It serves the Unix socket, enforces the load and heartbeat deadlines, kills the whole process group
on a hang or death and relaunches with backoff. It must not import torch or touch the ledger: it
reports events, and the supervisor decides what they mean for jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import protocol
from daemon.config import PoolSettings
from daemon.states import PoolState

log = logging.getLogger("wanbox.pool")

# Kept or added in the worker's environment: NCCL errors surface instead of hanging, and NVLink
# multicast stays off (it hangs or fails on some hosts).
NCCL_SAFETY_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
    "NCCL_TIMEOUT": "1800",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
KILL_GRACE_SECONDS = 5.0  # after SIGTERM on a hung pool, SIGKILL this much later


@dataclass
class PoolEvent:
    """Something the supervisor must act on: progress, done, error (from the worker) or died."""

    kind: str  # "progress" | "done" | "error" | "died" | "ready"
    job: str | None
    message: protocol.Message | None = None  # the worker's message (None for a death the pool detected)
    reason: str = ""


class WarmPool:
    """One torchrun process group with one model loaded; its state is a PoolState."""

    def __init__(self, settings: PoolSettings, socket_path: Path, crf: int = 18) -> None:
        self.settings = settings
        self.crf = crf
        self.socket_path = socket_path
        self.state = PoolState.STOPPED
        self.model: str | None = None
        self.job: str | None = None
        self.hello: protocol.Hello | None = None
        self.load_seconds: float | None = None
        self.failures = 0  # consecutive deaths, for the relaunch backoff
        self.next_launch_at = 0.0
        self.last_progress: protocol.Progress | None = None
        self.ready_at: datetime | None = None  # when the loaded model became ready (UTC)
        self.jobs_run = 0  # jobs handed to this pool since it was launched
        self.launches = 0  # launches and deaths since the supervisor started (the heartbeat stores them)
        self.deaths = 0
        self.last_message_at: datetime | None = None  # when the worker last said anything (UTC)
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: protocol.Channel | None = None
        self._generation = 0
        self._inbox: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self._deadline_from = 0.0  # monotonic time the current deadline counts from
        self._server: socket.socket | None = None
        self._closing = threading.Event()
        self._shutdown_sent = False  # after a shutdown request, the worker's exit is expected, not a death

    # --- life cycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Listen on the socket (once; launches reuse it)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._server = protocol.listen(self.socket_path)
        self._server.settimeout(0.5)
        threading.Thread(target=self._accept_loop, name="pool-accept", daemon=True).start()

    def command(self, model: str) -> list[str]:
        values = {
            "python": sys.executable,
            "nproc": str(self.settings.nproc),
            "model": model,
            "socket": str(self.socket_path),
            "checkpoint_dir": str(self.settings.checkpoint_dir(model)),
            "models_dir": str(self.settings.models_dir),
            "device": self.settings.device,
            "crf": str(self.crf),
        }
        try:
            argv = [part.format(**values) for part in self.settings.command]
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"pool.command {list(self.settings.command)!r}: bad placeholder {exc}; "
                f"expected only {', '.join('{' + k + '}' for k in values)}"
            ) from None
        # [pool] max_area and precision are settings, not command edits: appended, so they also reach a custom
        # command (argparse keeps the last value when the command carries one too).
        return argv + self._setting_flags()

    def _setting_flags(self) -> list[str]:
        flags = ["--max-area", str(self.settings.max_area)] if self.settings.max_area else []
        if self.settings.precision != "bf16":
            flags += ["--precision", self.settings.precision]
        return flags + (["--fp8-attention"] if self.settings.fp8_attention else [])

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in NCCL_SAFETY_ENV.items():
            env.setdefault(key, value)
        if self.settings.gpus != "all":
            env["CUDA_VISIBLE_DEVICES"] = self.settings.gpus
        # The worker imports `pipeline` and `daemon.protocol` from the same tree as this daemon.
        tree = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.settings.env)
        if self.settings.threads:
            # torch sizes its intra-op pool from OMP_NUM_THREADS; torchrun leaves a value it finds alone.
            env["OMP_NUM_THREADS"] = str(self.settings.threads)
        return env

    def can_launch(self, now: float | None = None) -> bool:
        return self.state == PoolState.STOPPED and (time.monotonic() if now is None else now) >= self.next_launch_at

    def launch(self, model: str) -> list[PoolEvent]:
        """Start the worker command for `model` in a new session; it must say hello+ready in time.

        Returns a `died` event when the command cannot even be started (missing program, bad template).
        """
        if self._server is None:
            self.open()
        self._generation += 1
        self._drop_channel()
        self.model, self.state, self.job, self.hello = model, PoolState.LOADING, None, None
        self.load_seconds, self.ready_at, self.jobs_run = None, None, 0
        self._shutdown_sent = False
        self._deadline_from = time.monotonic()
        self.launches += 1
        try:
            argv = self.command(model)
            log.info("pool: launching %s (generation %d): %s", model, self._generation, " ".join(argv))
            self._proc = subprocess.Popen(
                argv, env=self.environment(), start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=_log_stream(), stderr=_log_stream(),
            )
        except (OSError, ValueError) as exc:
            return self._died(f"the worker command could not be started: {exc}")
        return []

    @property
    def runtime(self) -> dict[str, Any]:
        """The loaded pool's torch and CUDA versions (cuda None on a CPU build), intra-op threads and pixel-area
        cap (None = none), as its hello reported them; {} before the hello or from an older worker."""
        return dict(self.hello.runtime) if self.hello is not None else {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._server.accept()  # type: ignore[union-attr]
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            generation = self._generation
            if self._chan is not None or self.state != PoolState.LOADING:
                log.warning("pool: refusing an extra connection (one rank 0 per pool)")
                conn.close()
                continue
            self._chan = protocol.Channel(conn)
            threading.Thread(target=self._read_loop, args=(self._chan, generation), daemon=True).start()

    def _read_loop(self, chan: protocol.Channel, generation: int) -> None:
        while True:
            try:
                msg = chan.recv()
            except protocol.ProtocolError as exc:
                self._inbox.put((generation, "garbage", str(exc)))
                return
            except OSError as exc:
                self._inbox.put((generation, "eof", str(exc)))
                return
            if msg is None:
                self._inbox.put((generation, "eof", "the worker closed the connection"))
                return
            self._inbox.put((generation, "msg", protocol.to_message(msg)))

    def _drop_channel(self) -> None:
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    # --- talking to the worker -----------------------------------------------------------------

    def _send(self, msg: protocol.Message) -> bool:
        if self._chan is None:
            return False
        try:
            self._chan.send(msg)
            return True
        except OSError as exc:
            log.warning("pool: cannot send %s: %s", msg.type, exc)
            return False

    def run(self, run: protocol.Run) -> bool:
        """Hand a job to an idle pool; False if it could not be sent (the pool is then treated as dead)."""
        if self.state != PoolState.IDLE:
            raise RuntimeError(f"pool is {self.state}, not idle: cannot run {run.job}")
        self.job, self.state, self.last_progress = run.job, PoolState.BUSY, None
        self.jobs_run += 1
        self._deadline_from = time.monotonic()
        return self._send(run)

    def request_shutdown(self) -> None:
        """Ask the worker to finish or abort its step and exit; its exit is then not counted as a death."""
        self._shutdown_sent = True
        self._send(protocol.Shutdown())

    def cancel(self, job: str) -> None:
        if self.job == job:
            self._send(protocol.Cancel(job=job))

    # --- events ----------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[PoolEvent]:
        """Messages that arrived (waiting up to `timeout` for the first), plus deaths and hangs."""
        events: list[PoolEvent] = []
        try:
            first = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            events.extend(self._handle(*first))
            while True:
                events.extend(self._handle(*self._inbox.get_nowait()))
        except queue.Empty:
            pass
        events.extend(self._check_health())
        return events

    def _handle(self, generation: int, what: str, payload: Any) -> list[PoolEvent]:
        if generation != self._generation or self.state == PoolState.STOPPED:
            return []  # from a pool that was already replaced
        if what == "eof" and self._shutdown_sent:
            self._reap_after_shutdown()
            return []
        if what == "eof":
            return self._died(f"the worker pool closed its connection ({payload})")
        if what == "garbage":
            return self._died(f"the worker pool sent an invalid message: {payload}")
        self._deadline_from = time.monotonic()  # any message is a sign of life
        self.last_message_at = datetime.now(timezone.utc)
        return self._on_message(payload)

    def _on_message(self, msg: protocol.Message) -> list[PoolEvent]:
        if isinstance(msg, protocol.Hello):
            self.hello = msg
            if msg.model != self.model:
                return self._died(f"the worker loaded {msg.model!r}, expected {self.model!r}")
            return []
        if isinstance(msg, protocol.Ready) and self.state == PoolState.LOADING:
            self.state, self.load_seconds, self.failures = PoolState.IDLE, float(msg.load_seconds), 0
            self.ready_at = datetime.now(timezone.utc)
            log.info("pool: %s ready after %.1f s", self.model, self.load_seconds)
            return [PoolEvent("ready", None, msg)]
        if isinstance(msg, protocol.Progress) and msg.job == self.job:
            self.last_progress = msg
            return [PoolEvent("progress", self.job, msg)]
        if isinstance(msg, (protocol.Done, protocol.Error)) and msg.job == self.job and self.job is not None:
            job, self.job, self.state = self.job, None, PoolState.IDLE
            return [PoolEvent(msg.type, job, msg)]
        if isinstance(msg, protocol.Error) and msg.job is None:
            # An error outside a job (e.g. loading failed): the pool is unusable.
            return self._died(f"the worker pool failed: {msg.kind}: {msg.message}", msg)
        if not isinstance(msg, protocol.Heartbeat):
            log.warning("pool: ignoring %s for job %s (current job: %s)", msg.type, getattr(msg, "job", None), self.job)
        return []

    def died(self, reason: str) -> list[PoolEvent]:
        """The supervisor found the pool unusable (e.g. a job could not be sent): kill it, count a death."""
        return self._died(reason)

    def _check_health(self) -> list[PoolEvent]:
        if self.state == PoolState.STOPPED or self._proc is None:
            return []
        code = self._proc.poll()
        if code is not None and self._shutdown_sent:
            self._reap_after_shutdown()
            return []
        if code is not None:
            return self._died(f"the worker pool exited with status {code}")
        silent = time.monotonic() - self._deadline_from
        if self.state == PoolState.LOADING and silent > self.settings.load_deadline_seconds:
            return self._died(f"the worker pool did not become ready within {self.settings.load_deadline_seconds:g} s")
        if self.state == PoolState.BUSY and silent > self.settings.heartbeat_seconds:
            step = self.last_progress
            where = f" (last: {step.phase} step {step.step}/{step.total})" if step else ""
            return self._died(
                f"the worker pool hung: no progress for {self.settings.heartbeat_seconds:g} s{where}"
            )
        return []

    def _died(self, reason: str, msg: protocol.Message | None = None) -> list[PoolEvent]:
        job = self.job
        log.error("pool: %s%s; killing its process group", reason, f" while running job {job}" if job else "")
        self.kill()
        self.failures += 1
        self.deaths += 1
        delay = min(self.settings.relaunch_cap_seconds, self.settings.relaunch_base_seconds * 2 ** (self.failures - 1))
        self.next_launch_at = time.monotonic() + delay
        return [PoolEvent("died", job, msg, reason)]

    # --- stopping --------------------------------------------------------------------------------

    def kill(self, grace: float = KILL_GRACE_SECONDS) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after `grace` s; returns the exit status."""
        proc, self._proc = self._proc, None
        self._drop_channel()
        self.state, self.job = PoolState.STOPPED, None
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                code = proc.wait()
        # Ranks or grandchildren may outlive the launcher: nothing of the group may keep GPU memory.
        _signal_group(proc.pid, signal.SIGKILL)
        return code

    def stop(self, grace: float | None = None) -> int | None:
        """Ask the pool to exit (shutdown: it finishes or aborts its step), then kill what is left."""
        grace = self.settings.stop_grace_seconds if grace is None else grace
        if self._proc is None:
            self.state = PoolState.STOPPED
            return None
        if not self._shutdown_sent:
            self.request_shutdown()
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("pool: did not exit within %.0f s of shutdown; killing it", grace)
        return self._reap_after_shutdown()

    def _reap_after_shutdown(self) -> int | None:
        """The worker left as asked: collect its status, make sure nothing of its group remains."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_GRACE_SECONDS)  # it closed the socket on its way out; let it finish exiting
        model, code = self.model, self.kill()
        log.info("pool: %s stopped (exit status %s)", model, code)
        return code

    def close(self) -> None:
        self.stop()
        self._closing.set()
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _log_stream() -> int | None:
    """The worker's output joins ours on stderr (journald under systemd); None (inherit) when our stderr is
    not a real file, e.g. when the supervisor is embedded or its stderr is captured in memory."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
