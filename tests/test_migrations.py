"""Alembic: up, down, up again, no drift between models and migrations, and SQL objects frozen per revision."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from alembic import command
from pgvector import Vector
from sqlalchemy import inspect, text

from recsys.catalog.ingest import ingest_file
from recsys.platform import migrations
from recsys.platform.db import get_engine
from recsys.platform.sql_objects import drop_object

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
    with engine.connect() as conn:
        assert _sql_objects(conn) == set()

    migrations.upgrade(empty_db)
    assert migrations.current_revision(empty_db) == migrations.head_revision()


def test_vector_types_are_registered_once_the_extension_exists(empty_db):
    """The engine's first connections predate `CREATE EXTENSION vector`; later checkouts register the types."""
    engine = get_engine(empty_db)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    migrations.upgrade(empty_db)
    with engine.connect() as conn:
        value = conn.execute(text("SELECT CAST('[1,2,3]' AS vector)")).scalar_one()
    assert isinstance(value, Vector) and value.to_list() == [1.0, 2.0, 3.0]


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


# ------------------------------------------------ SQL objects: definitions frozen per revision (sql/<revision>/)

SQL_DIR = migrations.SQL_DIR
OBJECTS_0002 = {"product_popularity", "copurchase", "similar_product", "similar_products", "search_products",
                "hybrid_search", "customer_history"}

# A later revision that changes two 0002 objects in ways CREATE OR REPLACE cannot (a new argument,
# a view column removed), and adds a materialized view that the revision after it changes again.
CHANGED_HISTORY = """CREATE FUNCTION customer_history(customer_id bigint, n integer DEFAULT 10,
                                 newest_first boolean DEFAULT true)
RETURNS TABLE (stock_code text, last_purchased_at timestamp)
LANGUAGE sql STABLE
AS $$
    SELECT pu.stock_code, max(pu.invoiced_at)
    FROM purchases pu WHERE pu.customer_id = customer_history.customer_id
    GROUP BY pu.stock_code
    ORDER BY CASE WHEN newest_first THEN max(pu.invoiced_at) END DESC NULLS LAST, max(pu.invoiced_at), pu.stock_code
    LIMIT greatest(n, 0);
$$;
COMMENT ON FUNCTION customer_history(bigint, integer, boolean) IS 'changed in 9001';
"""
CHANGED_POPULARITY = """CREATE VIEW product_popularity AS
SELECT p.stock_code, count(pu.id) AS purchase_lines
FROM products p LEFT JOIN purchases pu ON pu.stock_code = p.stock_code
GROUP BY p.stock_code;
"""
CUSTOMER_COUNTS = {
    "9001": "CREATE MATERIALIZED VIEW customer_counts AS SELECT count(*) AS customers FROM customers WITH NO DATA;",
    "9002": "CREATE MATERIALIZED VIEW customer_counts AS "
            "SELECT count(*) AS customers, count(*) * 2 AS doubled FROM customers WITH NO DATA;",
}
REVISION = '''"""test revision {revision}

Revision ID: {revision}
Revises: {down}
"""
from recsys.platform.sql_objects import install_objects

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None
NAMES = {names!r}


def upgrade():
    install_objects(NAMES, revision)


def downgrade():
    install_objects(NAMES, down_revision)
'''


@pytest.fixture(scope="module")
def later_project(tmp_path_factory) -> Path:
    """A copy of migrations/ and sql/ with two more revisions on top of the real head."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(migrations.MIGRATIONS_DIR, root / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SQL_DIR, root / "sql")
    head = migrations.head_revision()
    files = {
        "9001": {"customer_history": CHANGED_HISTORY, "product_popularity": CHANGED_POPULARITY,
                 "customer_counts": CUSTOMER_COUNTS["9001"]},
        "9002": {"customer_counts": CUSTOMER_COUNTS["9002"]},
    }
    for revision, down in (("9001", head), ("9002", "9001")):
        (root / "sql" / revision).mkdir()
        for name, definition in files[revision].items():
            (root / "sql" / revision / f"{name}.sql").write_text(definition)
        (root / "migrations" / "versions" / f"{revision}_test.py").write_text(
            REVISION.format(revision=revision, down=down, names=tuple(files[revision])))
    return root


def _migrate(settings, project: Path, action, revision: str) -> None:
    config = migrations.alembic_config(settings)
    config.set_main_option("script_location", str(project / "migrations"))
    with get_engine(settings).begin() as connection:
        config.attributes["connection"] = connection
        action(config, revision)


def _routines(conn, name: str) -> list[str]:
    return conn.execute(
        text("SELECT oid::regprocedure::text FROM pg_proc "
             "WHERE proname = :n AND pronamespace = 'public'::regnamespace"),
        {"n": name},
    ).scalars().all()


def _columns(conn, relation: str) -> list[str]:
    return conn.execute(
        text("SELECT attname FROM pg_attribute WHERE attrelid = CAST(:r AS regclass) AND attnum > 0 "
             "AND NOT attisdropped ORDER BY attnum"),
        {"r": relation},
    ).scalars().all()


def _sql_objects(conn) -> set[str]:
    return set(conn.execute(text(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = pg_proc.oid AND d.deptype = 'e') "
        "UNION SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('v', 'm', 'c')"
    )).scalars())


def _body(path: Path) -> str:
    return re.search(r"\$\$(.*)\$\$", path.read_text(), re.DOTALL).group(1)


def test_an_existing_database_gets_the_changed_definitions_and_loses_them_on_downgrade(db, sample_csv, later_project):
    ingest_file(sample_csv, db)
    engine = get_engine(db)
    _migrate(db, later_project, command.upgrade, "head")
    with engine.connect() as conn:
        assert _routines(conn, "customer_history") == ["customer_history(bigint,integer,boolean)"]
        oldest_first = conn.execute(text("SELECT stock_code FROM customer_history(15781, 2, false)")).scalars().all()
        assert _columns(conn, "product_popularity") == ["stock_code", "purchase_lines"]
    assert oldest_first == ["15056N", "21669"]

    _migrate(db, later_project, command.downgrade, migrations.head_revision())
    with engine.connect() as conn:
        assert _routines(conn, "customer_history") == ["customer_history(bigint,integer)"]
        newest = conn.execute(text("SELECT description FROM customer_history(15781, 1)")).scalar_one()
        assert "popularity_rank" in _columns(conn, "product_popularity")
        assert "customer_counts" not in _sql_objects(conn)
    assert newest == "ALARM CLOCK BAKELIKE PINK"


def test_a_fresh_database_replayed_to_0002_has_0002s_definitions(empty_db, later_project):
    _migrate(empty_db, later_project, command.upgrade, "0002")
    with get_engine(empty_db).connect() as conn:
        assert _sql_objects(conn) == OBJECTS_0002
        for name in ("similar_products", "search_products", "hybrid_search", "customer_history"):
            source = conn.execute(text("SELECT prosrc FROM pg_proc WHERE proname = :n"), {"n": name}).scalar_one()
            assert source == _body(later_project / "sql" / "0002" / f"{name}.sql")
        assert "popularity_rank" in _columns(conn, "product_popularity")

    _migrate(empty_db, later_project, command.upgrade, "head")
    with get_engine(empty_db).connect() as conn:
        source = conn.execute(text("SELECT prosrc FROM pg_proc WHERE proname = 'customer_history'")).scalar_one()
    assert source == _body(later_project / "sql" / "9001" / "customer_history.sql")


def test_a_redefined_materialized_view_keeps_its_rows(db, later_project):
    engine = get_engine(db)
    _migrate(db, later_project, command.upgrade, "9001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO customers (customer_id) VALUES (1), (2), (3)"))
        conn.execute(text("REFRESH MATERIALIZED VIEW customer_counts"))
    _migrate(db, later_project, command.upgrade, "9002")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT customers, doubled FROM customer_counts")).one() == (3, 6)
    _migrate(db, later_project, command.downgrade, "9001")
    with engine.connect() as conn:
        assert _columns(conn, "customer_counts") == ["customers"]
        assert conn.execute(text("SELECT customers FROM customer_counts")).scalar_one() == 3


def test_tables_are_never_dropped_as_sql_objects(db):
    with get_engine(db).begin() as conn, pytest.raises(ValueError, match="Alembic operations"):
        drop_object(conn, "products")


def test_shipped_sql_definitions_are_frozen():
    """Every file under sql/<revision>/ matches sql/SHA256SUMS: a shipped definition is never edited.

    A new revision's files are added with `cd sql && sha256sum <revision>/*.sql >> SHA256SUMS`.
    """
    listed = {}
    for line in (SQL_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {str(path.relative_to(SQL_DIR)) for path in SQL_DIR.glob("*/*.sql")}
    assert present == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((SQL_DIR / name).read_bytes()).hexdigest() == digest, f"{name} was edited"
