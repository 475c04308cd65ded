"""Alembic: up, down, up again, and no drift between models and migrations."""

from __future__ import annotations

from sqlalchemy import inspect, text

from recsys.platform import migrations
from recsys.platform.db import get_engine

TABLES = {"products", "customers", "purchases", "jobs", "result_cache", "feedback_events", "api_keys", "ingest_runs"}


def test_upgrade_downgrade_upgrade(empty_db):
    migrations.upgrade(empty_db)
    engine = get_engine(empty_db)
    assert TABLES <= set(inspect(engine).get_table_names())
    assert migrations.current_revision(empty_db) == migrations.head_revision()
    migrations.check(empty_db)

    migrations.downgrade(empty_db, "base")
    assert migrations.current_revision(empty_db) is None
    assert not (TABLES & set(inspect(engine).get_table_names()))

    migrations.upgrade(empty_db)
    assert migrations.current_revision(empty_db) == migrations.head_revision()


def test_hnsw_index_definition(db):
    with get_engine(db).connect() as conn:
        definition = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_products_embedding_hnsw'")
        ).scalar_one()
        history_index = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_purchases_customer_invoiced'")
        ).scalar_one()
    assert "hnsw (embedding vector_cosine_ops)" in definition
    assert "m='16'" in definition and "ef_construction='100'" in definition
    assert "(customer_id, invoiced_at DESC)" in history_index


def test_generated_full_text_column(db):
    with get_engine(db).begin() as conn:
        conn.execute(text("INSERT INTO products (stock_code, description) VALUES ('X1', 'WHITE METAL LANTERNS')"))
        matched = conn.execute(
            text("SELECT stock_code FROM products WHERE search_tsv @@ plainto_tsquery('english', 'lantern')")
        ).scalars().all()
    assert matched == ["X1"]
