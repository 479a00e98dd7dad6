"""Create the ledger: the jobs table and the events table (its audit log).

Frozen: written out column by column, independent of the models, so later model changes need a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = ("staged", "queued", "preprocessing", "ready", "sampling", "finalizing", "done", "failed",
          "rejected", "cancelled")  # fmt: skip


def state_type() -> sa.Enum:
    return sa.Enum(*STATES, native_enum=False, length=16, name="job_state")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model_id", sa.String(64), nullable=True),
        sa.Column("state", state_type(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("manifest_path", sa.Text(), nullable=False),
        sa.Column("work_dir", sa.Text(), nullable=True),
        sa.Column("params_json", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("input_hash", sa.String(128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("error_kind", sa.String(32), nullable=True),
        sa.Column("retry_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("phase", sa.String(32), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("total_steps", sa.Integer(), nullable=True),
        sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timings_json", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=True),
        sa.Column("outputs_json", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("staged_deadline", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_jobs_claim", "jobs", ["state", "priority", "created_at", "retry_after"])
    op.create_index("ix_jobs_input_hash", "jobs", ["input_hash"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_state", state_type(), nullable=True),
        sa.Column("to_state", state_type(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
    )
    op.create_index("ix_events_job_id", "events", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_events_job_id", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_jobs_input_hash", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_table("jobs")
