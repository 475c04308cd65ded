"""Discover jobs and feedback that acts: job kinds, purchases marked by source, feedback idempotency.

- `jobs.kind` is 'recommendation' or 'discover' (one job system, the worker dispatches by kind);
- `purchases.source` is 'ingest' (rows from a data file) or 'feedback' (a purchase a shop reported
  through POST /api/v1/feedback), so feedback purchases can be told apart and never collide with a file;
- `feedback_events.idempotency_key` (unique) makes a retried report record nothing twice, and
  `feedback_events.details` keeps what the event did (its purchase row, a replacement) to answer a retry.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_check_constraint("ck_jobs_kind", "jobs", "kind IN ('recommendation', 'discover')")
    op.add_column("purchases", sa.Column("source", sa.Text(), server_default="ingest", nullable=False))
    op.create_check_constraint("ck_purchases_source", "purchases", "source IN ('ingest', 'feedback')")
    op.add_column("feedback_events", sa.Column("idempotency_key", sa.Text(), nullable=True))
    op.add_column("feedback_events", sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.create_unique_constraint("feedback_events_idempotency_key_key", "feedback_events", ["idempotency_key"])
    op.create_index("ix_feedback_events_job", "feedback_events", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_feedback_events_job", table_name="feedback_events")
    op.drop_constraint("feedback_events_idempotency_key_key", "feedback_events", type_="unique")
    op.drop_column("feedback_events", "details")
    op.drop_column("feedback_events", "idempotency_key")
    op.drop_constraint("ck_purchases_source", "purchases", type_="check")
    op.drop_column("purchases", "source")
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
