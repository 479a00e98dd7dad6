"""Liveness: the hosts table (each daemon's heartbeat, pool and GPUs) and daemon_runs (one row per start).

Frozen: written out column by column, independent of the models, so later model changes need a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("host_id", sa.String(128), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("heartbeat_seconds", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("quiet_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pool_state", sa.String(16), nullable=True),
        sa.Column("pool_model", sa.String(64), nullable=True),
        sa.Column("pool_pid", sa.Integer(), nullable=True),
        sa.Column("current_job", sa.String(32), nullable=True),
        sa.Column("pool_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gpus_json", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("inbox_outage", sa.Text(), nullable=True),
        sa.Column("web_url", sa.Text(), nullable=True),
    )
    op.create_table(
        "daemon_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("host_id", sa.String(128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pool_launches", sa.Integer(), nullable=False),
        sa.Column("pool_deaths", sa.Integer(), nullable=False),
    )
    op.create_index("ix_daemon_runs_host_id", "daemon_runs", ["host_id"])


def downgrade() -> None:
    op.drop_index("ix_daemon_runs_host_id", table_name="daemon_runs")
    op.drop_table("daemon_runs")
    op.drop_table("hosts")
