"""The ledger's database as an operator sees it: `wanbox ledger migrate|status`, and what `doctor` checks.

It reads the schema revision and the server's clock, and upgrades the schema through daemon.ledger; it must
not change jobs, and must not create an SQLite file where none is (only `migrate` creates the ledger).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from daemon.ledger import SCHEMA_HEAD, Ledger, LedgerError, database_url

CLOCK_SKEW_WARN_S = 3.0  # leases and retry times are compared across hosts: their clocks must agree


@dataclass(frozen=True)
class LedgerInfo:
    """What one look at the database found."""

    url: str  # as configured, password hidden
    backend: str  # "sqlite" or "postgresql"
    server_version: str
    revision: str | None  # None: an empty database (serve or `wanbox ledger migrate` creates the schema)
    head: str = SCHEMA_HEAD  # the revision this wanbox writes
    clock_skew_s: float | None = None  # PostgreSQL: the server's clock minus this host's (None on SQLite)
    clock_uncertainty_s: float | None = None  # half the round trip of the clock query

    @property
    def up_to_date(self) -> bool:
        return self.revision == self.head


def shown(location: str | Path) -> str:
    """The ledger's URL for messages: never its password."""
    return make_url(database_url(location)).render_as_string(hide_password=True)


def missing_sqlite_file(location: str | Path) -> Path | None:
    """The SQLite file that does not exist yet (nothing to inspect), or None."""
    url = make_url(database_url(location))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    path = Path(url.database)
    return None if path.exists() else path


def inspect_ledger(location: str | Path, clock: Callable[[], float] = time.time) -> LedgerInfo:
    """Connect, read the revision (and on PostgreSQL the server's clock against `clock`); changes nothing.

    Raises FileNotFoundError for an SQLite ledger that does not exist, LedgerError when it cannot be reached.
    """
    if (path := missing_sqlite_file(location)) is not None:
        raise FileNotFoundError(f"no ledger at {path}: `wanbox serve` or `wanbox ledger migrate` creates it")
    try:
        with Ledger(location, migrate=False) as ledger, ledger.engine.connect() as conn:
            revision = ledger.revision()
            if ledger.backend != "postgresql":
                return LedgerInfo(ledger.shown_url, ledger.backend, f"SQLite {sqlite3.sqlite_version}", revision)
            version = str(conn.execute(text("SHOW server_version")).scalar())
            skew, uncertainty = _clock_skew(conn, clock)
            return LedgerInfo(ledger.shown_url, ledger.backend, f"PostgreSQL {version}", revision,
                              clock_skew_s=skew, clock_uncertainty_s=uncertainty)  # fmt: skip
    except SQLAlchemyError as err:
        raise LedgerError(f"cannot reach the ledger at {shown(location)}: {_reason(err)}") from err


def _clock_skew(conn: Connection, clock: Callable[[], float]) -> tuple[float, float]:
    """The server's now() minus this host's UTC time at the middle of the round trip, and half the trip."""
    before = clock()
    server = conn.execute(text("SELECT now()")).scalar_one()
    after = clock()
    middle = datetime.fromtimestamp((before + after) / 2, timezone.utc)
    return (server - middle) / timedelta(seconds=1), (after - before) / 2


def migrate(location: str | Path) -> tuple[str | None, str | None]:
    """Alembic `upgrade head` on the ledger (created if new); returns the revisions before and after."""
    try:
        with Ledger(location, migrate=False) as ledger:
            before = ledger.revision()
            ledger.upgrade()
            return before, ledger.revision()
    except SQLAlchemyError as err:
        raise LedgerError(f"cannot reach the ledger at {shown(location)}: {_reason(err)}") from err


def _reason(err: SQLAlchemyError) -> str:
    """The driver's own words (e.g. "connection refused"), without SQLAlchemy's background link."""
    return str(getattr(err, "orig", None) or err).strip().splitlines()[0]


def describe(info: LedgerInfo) -> list[str]:
    """`wanbox ledger status`, one fact a line."""
    if info.revision is None:
        schema = f"none (an empty database): `wanbox ledger migrate` creates it at {info.head}"
    elif info.up_to_date:
        schema = f"{info.revision} (the newest this wanbox knows)"
    else:
        schema = f"{info.revision}, but this wanbox writes {info.head}: run `wanbox ledger migrate`"
    lines = [f"ledger:   {info.url}", f"backend:  {info.backend} ({info.server_version})", f"schema:   {schema}"]
    if info.clock_skew_s is not None:
        lines.append(f"clock:    the database server is {info.clock_skew_s:+.3f} s from this host")
    return lines
