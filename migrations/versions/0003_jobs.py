"""Durable jobs: a claim lease and a retry time on jobs, partial indexes for the claim and the sweeper.

`lease_expires_at` lets a job left `running` by a killed worker be claimed again once its
lease runs out (live workers renew it); `run_after` holds a retried job back until its backoff ends.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("run_after", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_queued_created", "jobs", ["created_at"], unique=False, postgresql_where=sa.text("status = 'queued'")
    )
    op.create_index(
        "ix_jobs_running_lease",
        "jobs",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_running_lease", table_name="jobs", postgresql_where=sa.text("status = 'running'"))
    op.drop_index("ix_jobs_queued_created", table_name="jobs", postgresql_where=sa.text("status = 'queued'"))
    op.drop_column("jobs", "run_after")
    op.drop_column("jobs", "lease_expires_at")
