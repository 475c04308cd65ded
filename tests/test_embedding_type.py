"""Products stored as halfvec (RECSYS_EMBEDDING_TYPE) and the HNSW build settings sized from the catalog."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from recsys.catalog.retrieval import search
from recsys.platform import hnsw as index
from recsys.platform import migrations
from recsys.platform.db import dispose_engines, get_engine


def test_build_memory_holds_the_measured_graph():
    # pgvector 0.8 filled 1 GB after 482,160 vector(384) tuples at m=16: the estimate must cover that
    assert index.build_memory_mb(482_160, "vector") * 2**20 >= 2**30
    one_million = index.build_memory_mb(1_000_000, "vector")
    assert 2_600 <= one_million <= 2_800
    assert index.build_memory_mb(1_000_000, "halfvec") < one_million * 0.7
    assert index.build_memory_mb(10, "vector") == 64
    with pytest.raises(ValueError, match="halfvec"):
        index.build_memory_mb(10, "float16")


def test_parallel_workers_leave_the_leader_a_core():
    assert index.parallel_workers(1) == 0
    assert index.parallel_workers(2) == 1
    assert index.parallel_workers(64) == index.MAX_PARALLEL_WORKERS


def _index_definition(settings) -> str:
    with get_engine(settings).connect() as conn:
        return conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                            {"n": index.INDEX_NAME}).scalar_one()


def test_halfvec_storage_keeps_search_and_sql_functions_working(loaded_db):
    before = [hit.stock_code for hit in search("lantern", 5, loaded_db)]
    halfvec = loaded_db.with_(embedding_type="halfvec")

    migrations.upgrade(halfvec)  # applies the setting to an already migrated database
    dispose_engines()
    with get_engine(halfvec).connect() as conn:
        assert index.column_type(conn) == "halfvec"
        similar = conn.execute(text("SELECT stock_code FROM similar_products('90001B', 2)")).scalars().all()
    assert "halfvec_cosine_ops" in _index_definition(halfvec)
    assert len(similar) == 2
    # float16 keeps 3 significant digits: the same nearest products come back
    assert [hit.stock_code for hit in search("lantern", 5, halfvec)] == before

    migrations.upgrade(loaded_db)  # and back
    dispose_engines()
    with get_engine(loaded_db).connect() as conn:
        assert index.column_type(conn) == "vector"
    assert "vector_cosine_ops" in _index_definition(loaded_db)


def test_index_build_sets_memory_and_workers_for_its_own_transaction(loaded_db):
    with get_engine(loaded_db).begin() as conn:
        done = index.build_index(conn)
        inside = conn.execute(text("SHOW maintenance_work_mem")).scalar_one()
    assert done["rows"] > 0 and done["maintenance_work_mem"] == "64MB" == inside
    with get_engine(loaded_db).connect() as conn:
        assert conn.execute(text("SHOW maintenance_work_mem")).scalar_one() != "64MB"  # SET LOCAL ended
    assert index.INDEX_NAME in _index_definition(loaded_db)


def test_a_bulk_embed_builds_the_index_once_and_keeps_it_after_a_failure(db, sample_csv, monkeypatch):
    from recsys.catalog import embedding
    from recsys.catalog.ingest import ingest_file

    ingest_file(sample_csv, db)
    monkeypatch.setattr(embedding, "BULK_INDEX_REBUILD", 1)
    real_encode = embedding.encode

    def failing_encode(texts, settings):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(embedding, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        embedding.embed_products(db)
    assert index.INDEX_NAME in _index_definition(db)  # rebuilt although the run failed

    monkeypatch.setattr(embedding, "encode", real_encode)
    report = embedding.embed_products(db)
    assert report.embedded > 0
    assert "vector_cosine_ops" in _index_definition(db)
    assert [hit.stock_code for hit in search("bag charm", 3, db)][0].startswith("90001")


def test_migration_0007_stores_the_configured_type_and_its_downgrade_vector(empty_db):
    halfvec = empty_db.with_(embedding_type="halfvec")
    migrations.upgrade(halfvec, "0007")  # the migration itself, not the step after head
    with get_engine(halfvec).connect() as conn:
        assert index.column_type(conn) == "halfvec"
    assert "halfvec_cosine_ops" in _index_definition(halfvec)
    migrations.downgrade(halfvec, "0006")
    with get_engine(halfvec).connect() as conn:
        assert index.column_type(conn) == "vector"
    assert "vector_cosine_ops" in _index_definition(halfvec)
