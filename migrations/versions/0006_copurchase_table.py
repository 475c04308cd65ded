"""copurchase becomes a table kept up to date on every purchase insert (it was a materialized view recomputed in full).

- `copurchase (stock_code, other_stock_code, invoices)`: same name, columns and rows as the view
  (ordered pairs of products in at least two common invoices), primary key on the pair;
- `copurchase_singles (stock_code, other_stock_code)`: pairs in exactly one invoice, waiting for a second;
- `copurchase_count(bigint[])` (sql/0006): counts new purchase lines in, touching only their invoices;
- trigger `purchases_copurchase_count`: after each INSERT statement on purchases, with its new rows
  (`copurchase_count_inserted`, sql/0006); an ingest defers it and counts once (recsys.catalog.copurchase).
Existing purchases are counted by one full rebuild. Downgrade brings back the materialized view, refreshed.
Like the view before them, the two tables belong to the SQL surface, not to the models.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from recsys.catalog.copurchase import rebuild_copurchase
from recsys.platform.sql_objects import drop_object, install_objects

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_OBJECTS = ("copurchase_count", "copurchase_count_inserted")
TRIGGER = "purchases_copurchase_count"


def upgrade() -> None:
    drop_object(op.get_bind(), "copurchase")
    op.create_table(
        "copurchase",
        sa.Column("stock_code", sa.Text(), nullable=False),
        sa.Column("other_stock_code", sa.Text(), nullable=False),
        sa.Column("invoices", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("stock_code", "other_stock_code", name="ix_copurchase_pair"),
    )
    op.create_table(
        "copurchase_singles",
        sa.Column("stock_code", sa.Text(), nullable=False),
        sa.Column("other_stock_code", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("stock_code", "other_stock_code", name="copurchase_singles_pkey"),
    )
    op.execute(
        "COMMENT ON TABLE copurchase IS 'Item-to-item co-occurrence: for each ordered pair of products, the number "
        "of invoices that contain both (pairs seen in fewer than two invoices are left out). Kept up to date by a "
        "trigger on purchases.'"
    )
    install_objects(SQL_OBJECTS, revision)
    op.execute(
        f"CREATE TRIGGER {TRIGGER} AFTER INSERT ON purchases REFERENCING NEW TABLE AS inserted_purchases "
        "FOR EACH STATEMENT EXECUTE FUNCTION copurchase_count_inserted()"
    )
    rebuild_copurchase(op.get_bind())


def downgrade() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON purchases")
    install_objects(SQL_OBJECTS, down_revision)
    op.drop_table("copurchase_singles")
    op.drop_table("copurchase")
    install_objects(("copurchase",), down_revision)
    op.execute("REFRESH MATERIALIZED VIEW copurchase")
