"""An index on products.embedded_at, so the catalog version in every result-cache key is read from it.

The cache key of each recommendation request (cached answer or submission) reads
`count(embedded_at), max(embedded_at) FROM products`; without an index that scans the whole table
with its vectors (3,665 rows, 7.5 MB: 10.3 ms of the query's 10.5 ms at load 12), with it an
index-only scan (0.6 ms). Issue 16.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_products_embedded_at", "products", ["embedded_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_products_embedded_at", table_name="products")
