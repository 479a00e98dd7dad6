"""Connecting to the ledger's database: URLs, engines (SQLite WAL pragmas, PostgreSQL timeouts), Alembic.

It knows nothing about jobs; refusing a SQLite file on a network filesystem is its one policy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url

from daemon.ledger.errors import LedgerError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA_HEAD = "0006"  # the newest revision in migrations/versions (a test keeps them equal)
UPGRADE_LOCK_KEY = 0x77616E626F78  # "wanbox": the PostgreSQL advisory lock that serialises schema upgrades


def database_url(path_or_url: str | Path) -> str:
    """A SQLAlchemy URL from a file path (SQLite) or a URL given as is (e.g. postgresql+psycopg://...)."""
    text = str(path_or_url)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph",
                                  "glusterfs", "fuse.glusterfs", "lustre", "fuse.s3fs", "fuse.rclone"})  # fmt: skip


def network_filesystem(path: Path, mounts: str) -> str | None:
    """The network filesystem type `path` lives on, from /proc/mounts text; None for a local disk."""
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = path == Path(mount_point) or Path(mount_point) in path.parents
        if inside and len(mount_point) >= len(best):  # the deepest mount point holding the path wins
            best, fstype = mount_point, fields[2]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def check_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    folder = Path(parsed.database).parent
    if not folder.is_dir():
        raise LedgerError(
            f"the ledger's folder {folder} does not exist: create it (it is the daemon's state directory, "
            "on a local disk) or point the ledger setting elsewhere"
        )
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return  # not Linux: nothing to check against
    fstype = network_filesystem(folder.resolve(), mounts)
    if fstype is not None:
        raise LedgerError(
            f"the ledger {parsed.database} is on a network filesystem ({fstype}): SQLite's locking does not "
            "work there and the ledger could be corrupted. Keep the state directory on a local disk (the "
            "inbox and outbox may stay on the share), or use a PostgreSQL URL for a shared queue"
        )


def make_engine(url: str, busy_timeout_s: float) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # The same patience as SQLite's busy timeout: a statement waiting longer for a lock held by another
        # host fails instead of hanging; and an unreachable server is reported instead of waited on forever.
        args: dict[str, Any] = {"options": f"-c lock_timeout={int(busy_timeout_s * 1000)}"}
        if "connect_timeout" not in parsed.query:
            args["connect_timeout"] = 10
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s})
    event.listen(engine, "connect", _sqlite_on_connect(busy_timeout_s))
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(busy_timeout_s: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (see _sqlite_begin), so the driver must not start transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, and vice versa
        cursor.execute("PRAGMA synchronous = FULL")  # a committed transition survives a power cut
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return on_connect


def _sqlite_begin(conn: Any) -> None:
    # Writers take the write lock at BEGIN (IMMEDIATE), so a read-then-write transaction waits politely in
    # busy_timeout instead of failing with "database is locked" when another process wrote in between.
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config(url: str) -> Any:
    """An Alembic Config for this package's migrations; no alembic.ini needed."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config
