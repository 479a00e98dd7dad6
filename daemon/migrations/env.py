"""Alembic environment for the job ledger: runs migrations on the connection Ledger.upgrade passes in.

It must not configure logging or read an ini file: the daemon calls it in-process at every start.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

import daemon.deliveries  # noqa: F401 - registers the notification tables on Base.metadata
import daemon.hosts  # noqa: F401 - its tables join Base.metadata (autogenerate compares against all of them)
import daemon.ledger.claims  # noqa: F401 - the ingest claims (revision 0006)
import daemon.ledger.intents  # noqa: F401 - the intents table (revision 0005)
from daemon.ledger import Base

config = context.config


def run_on(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so later revisions copy-and-move tables instead.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as own_connection:
        run_on(own_connection)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
