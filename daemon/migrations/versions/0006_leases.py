"""Several hosts on one ledger: a running job's holder and lease, the host each event (so each attempt) was
written by, a host's drain request, the host an intent belongs to, and the ingest claims (one host per upload).

Frozen: written out column by column, independent of the models, so later model changes need a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("holder", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_lease", "jobs", ["state", "lease_until"])
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("host", sa.String(128), nullable=True))
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("drain", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("intents") as batch:
        batch.add_column(sa.Column("host_id", sa.String(128), nullable=True))
    op.create_table(
        "ingest_claims",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("host_id", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ingest_claims_job_id", "ingest_claims", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_ingest_claims_job_id", "ingest_claims")
    op.drop_table("ingest_claims")
    with op.batch_alter_table("intents") as batch:
        batch.drop_column("host_id")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("drain")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("host")
    op.drop_index("ix_jobs_lease", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("holder")
