"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, served on a free local port.

Test and benchmark support only (tests/conftest.py, bench/bench_claims.py): it runs the distribution's server
binaries as an unprivileged user and removes everything it made; it must never touch a system cluster, and the
daemon itself must never use it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "wanbox"  # the cluster's superuser (trust authentication: it is reachable from this host only)
SERVER_USER = "postgres"  # who runs the server when the tests run as root (the package creates this user)


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else the newest /usr/lib/postgresql/N/bin (Debian keeps
    them off PATH)."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(v) for v in versions), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                         reverse=True)  # fmt: skip
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def unavailable() -> str | None:
    """Why no cluster can be started here (None when one can): server binaries or the driver missing."""
    if find_bin_dir() is None:
        return ("PostgreSQL's server binaries (initdb, pg_ctl) are not on PATH nor in /usr/lib/postgresql/N/bin: "
                "apt-get install postgresql (Debian/Ubuntu)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed: pip install -e '.[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root, and there is no {SERVER_USER!r} user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """One initdb'd cluster in `folder`; `start`/`stop` may be called again (e.g. a restart under load)."""

    bin_dir: Path
    folder: Path
    port: int
    as_user: str | None  # the OS user the server runs as (None: this process's user)
    databases: int = field(default=0)  # how many create_database made (for unique names)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.as_user, "--"] if self.as_user else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout, cwd=self.folder)
        if done.returncode != 0:
            log = (self.folder / "server.log").read_text()[-2000:] if (self.folder / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}\n{log}")
        return done

    def init(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions")  # fmt: skip
        settings = (
            f"port = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.folder}'\n"
            "max_connections = 200\n"  # several ledgers (engines) per test, each with its own pool
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(settings)

    def start(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (roll back open transactions), or "immediate" (like a crash)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        prefix = ["runuser", "-u", self.as_user, "--"] if self.as_user else []
        status = subprocess.run([*prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"],
                                capture_output=True, text=True, cwd=self.folder)  # fmt: skip
        return status.returncode == 0

    def version(self) -> str:
        """e.g. "PostgreSQL 15.18" (the server binaries' own words)."""
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True).stdout
        return out.replace("postgres (PostgreSQL)", "PostgreSQL").strip() or str(self.bin_dir)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(sql)

    def create_database(self) -> str:
        """A new, empty database (a copy of template1, as CREATE DATABASE makes them); returns its URL."""
        self.databases += 1
        name = f"test_{self.databases}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")  # FORCE: leaked sessions

    def destroy(self) -> None:
        try:
            if self.running:
                self.stop("immediate")  # nothing in it is worth a checkpoint
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster() -> Cluster:
    """initdb + start in a new temporary folder (the server user owns it); the caller destroys it."""
    bin_dir = find_bin_dir()
    assert bin_dir is not None, unavailable()
    as_user = SERVER_USER if os.geteuid() == 0 else None  # the server refuses to run as root
    folder = Path(tempfile.mkdtemp(prefix="wanbox-pg-"))
    if as_user:
        entry = pwd.getpwnam(as_user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(bin_dir, folder, free_port(), as_user)
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return cluster


def timed_start() -> tuple[Cluster, float]:
    """start_cluster and the seconds it took (initdb + start), for the report in the test summary."""
    began = time.perf_counter()
    return start_cluster(), time.perf_counter() - began
