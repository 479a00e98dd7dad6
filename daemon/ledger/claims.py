"""Ingest claims: one row per upload that some host took in, under a unique key (the manifest's inbox path and
its file identity), written in the same transaction as the staged job it became. Whoever inserts the row first
ingests the upload; every other host finds the key taken and leaves the files alone.

The table and its SQL only (daemon/ingest.py makes the keys; the Ledger writes the rows).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from daemon.ledger.tables import Base, UTCDateTime


class IngestClaim(Base):
    """This host took in this upload (as job `job_id`); rows go with their job."""

    __tablename__ = "ingest_claims"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    host_id: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"<IngestClaim {self.key!r} {self.host_id} {self.job_id}>"

