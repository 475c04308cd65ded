"""SQL surface for analysts: similar_products, search_products, hybrid_search, customer_history,
product_popularity and the copurchase materialized view (definitions frozen in sql/0002/).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from recsys.platform.sql_objects import install_objects

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_OBJECTS = (
    "product_popularity",
    "copurchase",
    "similar_product",
    "similar_products",
    "search_products",
    "hybrid_search",
    "customer_history",
)


def upgrade() -> None:
    install_objects(SQL_OBJECTS, revision)


def downgrade() -> None:
    install_objects(SQL_OBJECTS, down_revision)
