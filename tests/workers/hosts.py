"""Test harness for several hosts: N real `wanbox serve` processes, each with its own host id (WANBOX_HOST_ID),
pool socket and worker, on ONE shared root (inbox, outbox, failed, work, state) and one PostgreSQL ledger.

Built on harness.Root (one per host, for its config file, knobs and log). Each host's pool is the real
pipeline.worker on tiny models (`pool=real_pool(...)`) or, for the tests about the ledger's timing,
fake_pool_worker.py. It must not be imported by the daemon itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.ledger import Ledger
from tests.workers.harness import REPO, Root, alive, manifest_text, wait_for, write_image

LEASE_SECONDS = 4.0  # short, so that a dead host's job moves on within the test


class Hosts:
    """`n` hosts on `tmp/shared`; host i is `host-i` (its log: tmp/host-i/daemon.log)."""

    def __init__(self, tmp: Path, url: str, n: int, **sections: dict[str, Any]) -> None:
        self.url = url
        self.shared = tmp / "shared"
        self.inbox, self.outbox, self.work = self.shared / "inbox", self.shared / "outbox", self.shared / "work"
        jobs = {"max_attempts": 3, "lease_seconds": LEASE_SECONDS, **sections.pop("jobs", {})}
        self.roots = [Root(tmp / f"host-{i}", paths={"root": str(self.shared), "ledger": url}, jobs=jobs, **sections)
                      for i in range(n)]  # fmt: skip
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.ledger = Ledger.open(url)  # the test's view (no host id: it writes nothing)

    def host_id(self, i: int) -> str:
        return f"host-{i}"

    def index(self, host_id: str) -> int:
        return int(host_id.removeprefix("host-"))

    def start(self, i: int, **env: str) -> subprocess.Popen[bytes]:
        """`wanbox serve` as host i (extra environment: e.g. WANBOX_FREEZE_AT)."""
        root = self.roots[i]
        full = {**os.environ, "WANBOX_HOST_ID": self.host_id(i), **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        full.pop("NOTIFY_SOCKET", None)
        with open(root.log, "ab") as log:
            self.procs[i] = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--config", str(root.config)],
                                             cwd=REPO, env=full, stdout=log, stderr=log)  # fmt: skip
        return self.procs[i]

    def wait_serving(self, *which: int, timeout: float = 60) -> None:
        def serving() -> bool:
            states = {h.host_id: h.state for h in self.hosts_rows()}
            return all(states.get(self.host_id(i)) == "serving" for i in which)

        wait_for(serving, timeout, lambda: f"hosts not serving: {[(h.host_id, h.state) for h in self.hosts_rows()]}"
                                           f"\n{self.logs()}")  # fmt: skip

    def hosts_rows(self) -> list[Any]:
        from daemon.hosts import HostRecords

        return HostRecords(self.ledger.engine).hosts()

    def drop(self, name: str, steps: int = 3, frames: int = 5) -> Path:
        """An upload as a careful user makes it (image first, manifest last), into the shared inbox."""
        temp = write_image(self.inbox / f".{name}.jpg.{secrets.token_hex(3)}")
        os.rename(temp, self.inbox / f"{name}.jpg")
        manifest = self.inbox / f"{name}.toml"
        temp = self.inbox / f".{name}.toml.{secrets.token_hex(3)}"
        temp.write_text(manifest_text(image=f'"{name}.jpg"', prompt=name, steps=steps, frames=frames))
        os.rename(temp, manifest)
        return manifest

    def jobs(self) -> list[Any]:
        return self.ledger.list(limit=None, newest_first=False)

    def wait_done(self, count: int, timeout: float) -> list[Any]:
        def finished() -> bool:
            jobs = self.jobs()
            return len(jobs) >= count and all(j.state.value == "done" for j in jobs)

        wait_for(finished, timeout, lambda: f"{[(j.name, j.state.value, j.holder) for j in self.jobs()]}\n"
                                            f"{self.logs()}")  # fmt: skip
        return self.jobs()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- host-{i} ---\n{r.log_text()[-tail:]}" for i, r in enumerate(self.roots))

    def outbox_names(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir()) if self.outbox.exists() else []

    def sidecar_jobs(self) -> list[str]:
        return sorted(json.loads(p.read_text())["job_id"] for p in self.outbox.glob("*.json"))

    def pool_pids(self, i: int) -> list[int]:
        """Host i's pool processes (torchrun and its ranks, or the fake worker): those naming its socket."""
        socket = str(self.roots[i].socket).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and socket in (entry / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
        return pids

    def kill_pool(self, i: int) -> None:
        for pid in self.pool_pids(i):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def stop_all(self) -> None:
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for i, proc in list(self.procs.items()):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            del self.procs[i]

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for i, root in enumerate(self.roots):
            for pid in root.worker_pids():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self.kill_pool(i)
        self.ledger.close()


def frozen(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process is stopped (SIGSTOP: state T in /proc)."""
    try:
        with open(f"/proc/{proc.pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] in ("T", "t")
    except OSError:
        return False
