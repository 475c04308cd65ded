"""An index that gives each product's strongest co-purchase partners in order.

The candidate stage reads the `NEIGHBOURS` strongest partners of every customer's recent purchases
(`ORDER BY invoices DESC, other_stock_code LIMIT 50` per product). With only the pair index each
product's partners were all fetched and sorted: 720 ms for 300 products, 15 ms of a retrieval job's
21 ms on the jobs bench. With this index it is an index-only scan (6 ms for the same 300). Issue 11
(the worker's throughput may not fall by more than 20%).

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_copurchase_strongest",
        "copurchase",
        ["stock_code", sa.text("invoices DESC"), "other_stock_code"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_copurchase_strongest", table_name="copurchase")
