"""SQL surface for analysts: similar_products, search_products, hybrid_search, customer_history,
product_popularity and the copurchase materialized view (files in sql/).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

from recsys.platform.sql_objects import drop_statements, execute_raw, install_statements

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    execute_raw(op.get_bind(), install_statements())


def downgrade() -> None:
    execute_raw(op.get_bind(), drop_statements())
