"""The job ledger: every job and every state change, in SQLite (WAL) or PostgreSQL, via SQLAlchemy 2.

errors (what it refuses), tables (the rows), database (connecting, migrations), statements (the SQL and the
scheduling rule), store (the Ledger). SQLite files must live on a local disk (WAL locking does not work over NFS/SMB).
"""

from daemon.ledger.database import (
    MIGRATIONS_DIR,
    SCHEMA_HEAD,
    UPGRADE_LOCK_KEY,
    alembic_config,
    database_url,
    network_filesystem,
)
from daemon.ledger.errors import AmbiguousJobId, IllegalTransition, JobNotFound, LeaseLost, LedgerError
from daemon.ledger.leases import Fence
from daemon.ledger.statements import next_query
from daemon.ledger.store import Backoff, Ledger, new_job_id
from daemon.ledger.tables import SETTABLE_FIELDS, Base, Event, JobRecord, UTCDateTime, utcnow

__all__ = [
    "MIGRATIONS_DIR", "SCHEMA_HEAD", "SETTABLE_FIELDS", "UPGRADE_LOCK_KEY", "AmbiguousJobId", "Backoff", "Base",
    "Event", "Fence", "IllegalTransition", "JobNotFound", "JobRecord", "LeaseLost", "Ledger", "LedgerError", "UTCDateTime",
    "alembic_config", "database_url", "network_filesystem", "new_job_id", "next_query", "utcnow",
]  # fmt: skip
