"""The catalog version as one row kept by a trigger, read in O(1) by every result-cache key.

Each recommendation request's cache key held `count(embedded_at), max(embedded_at) FROM products`:
an index-only scan over every product (0.69 ms of the 0.77 ms fingerprint query at 3,665 products,
and linear in the catalog: a 1M-product shop would pay it on every cached answer). Now
`catalog_version` holds one counter that `bump_catalog_version()` (sql/0010) increments after every
statement that inserted, updated or deleted at least one product, or truncated the table (each
trigger passes its rows as the transition table `changed_products`; a statement that changed nothing,
like an unchanged ingest's `INSERT … ON CONFLICT DO NOTHING`, keeps the cache). Products change only
through ingest and embedding, so counting every changing statement costs no cache hits; a column list
(`UPDATE OF embedding, …`) would make the trigger depend on those columns and block
`ALTER … TYPE halfvec` (migration 0007's conversion). Issue 16 (cached POST throughput).

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from recsys.platform.sql_objects import install_objects

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_OBJECTS = ("bump_catalog_version",)
TRIGGERS = {  # a trigger with a transition table has one event
    "products_catalog_version_insert": "AFTER INSERT ON products REFERENCING NEW TABLE AS changed_products",
    "products_catalog_version_update": "AFTER UPDATE ON products REFERENCING NEW TABLE AS changed_products",
    "products_catalog_version_delete": "AFTER DELETE ON products REFERENCING OLD TABLE AS changed_products",
    "products_catalog_version_truncate": "AFTER TRUNCATE ON products",
}


def upgrade() -> None:
    op.create_table(
        "catalog_version",
        sa.Column("id", sa.SmallInteger(), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_catalog_version_one_row"),
    )
    op.execute("INSERT INTO catalog_version (id, version) VALUES (1, 1)")
    install_objects(SQL_OBJECTS, revision)
    for name, when in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {when} FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version()")


def downgrade() -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON products")
    install_objects(SQL_OBJECTS, down_revision)
    op.drop_table("catalog_version")
