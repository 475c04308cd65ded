"""The SQL functions and views an analyst uses from psql, and the Python layer over them."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from pgvector import Vector
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from recsys.catalog.history import history, history_vector, history_vectors, recent_histories
from recsys.catalog.ingest import ingest_file
from recsys.catalog.retrieval import search, search_by_vector, search_many, similar
from recsys.cli import cli
from recsys.platform.db import get_engine
from recsys.rankers.item_stats import DatabaseItemStats

DIM = 384


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


@pytest.fixture
def synthetic_catalog(db):
    """1,500 products around a few directions; customer 1 bought the 300 nearest to `query`."""
    rng = np.random.default_rng(7)
    basis = rng.normal(size=(16, DIM))
    vectors = np.array([unit(rng.normal(size=16) @ basis + 0.3 * rng.normal(size=DIM)) for _ in range(1500)])
    query = unit(vectors[:20].mean(axis=0))
    nearest = np.argsort(-(vectors @ query))
    bought = [f"S{i:05d}" for i in nearest[:300]]
    engine = get_engine(db)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO customers (customer_id) VALUES (1), (2)"))
        for i, vector in enumerate(vectors):
            conn.execute(
                text("INSERT INTO products (stock_code, description, embedding, embedding_model) "
                     "VALUES (:code, :desc, :v, 'synthetic')"),
                {"code": f"S{i:05d}", "desc": f"SYNTHETIC ITEM {i}", "v": vector.astype(np.float32)},
            )
        conn.execute(
            text("INSERT INTO purchases (row_hash, invoice_no, stock_code, customer_id, description, quantity, "
                 "unit_price, invoiced_at) SELECT decode(md5(code), 'hex'), 'INV1', code, 1, 'x', 1, 1, now() "
                 "FROM unnest(CAST(:codes AS text[])) AS code"),
            {"codes": bought},
        )
    return {"settings": db, "query": query, "bought": set(bought), "nearest": [f"S{i:05d}" for i in nearest]}


def test_search_products_excludes_purchases_and_still_returns_k(synthetic_catalog):
    settings, query = synthetic_catalog["settings"], synthetic_catalog["query"]
    hits = search_by_vector(query, 10, settings, ef_search=40, exclude_customer=1)
    assert len(hits) == 10
    assert not {h.stock_code for h in hits} & synthetic_catalog["bought"]
    expected = [c for c in synthetic_catalog["nearest"] if c not in synthetic_catalog["bought"]][:10]
    assert len({h.stock_code for h in hits} & set(expected)) >= 8
    unfiltered = search_by_vector(query, 10, settings, ef_search=40)
    assert {h.stock_code for h in unfiltered} <= synthetic_catalog["bought"]


def test_search_many_answers_each_vector_as_a_single_search_would(synthetic_catalog):
    settings, query = synthetic_catalog["settings"], synthetic_catalog["query"]
    other = unit(np.ones(DIM))
    batched = search_many([query, other, query], 10, settings, ef_search=40, exclude_customers=[1, None, None])
    assert [len(hits) for hits in batched] == [10, 10, 10]
    assert batched[0] == search_by_vector(query, 10, settings, ef_search=40, exclude_customer=1)
    assert batched[1] == search_by_vector(other, 10, settings, ef_search=40)
    assert batched[2] == search_by_vector(query, 10, settings, ef_search=40)
    assert not {h.stock_code for h in batched[0]} & synthetic_catalog["bought"]
    assert search_many([], 10, settings) == []
    with pytest.raises(ValueError, match="one entry per query"):
        search_many([query], 10, settings, exclude_customers=[1, 2])


def test_without_iterative_scan_the_same_filter_starves(synthetic_catalog):
    """Why search_products turns iterative scans on: the plain filtered index scan comes up short."""
    with get_engine(synthetic_catalog["settings"]).begin() as conn:
        conn.execute(text("SET LOCAL hnsw.ef_search = 40"))
        conn.execute(text("SET LOCAL hnsw.iterative_scan = off"))
        rows = conn.execute(
            text("SELECT stock_code FROM products p WHERE NOT EXISTS (SELECT 1 FROM purchases pu "
                 "WHERE pu.customer_id = 1 AND pu.stock_code = p.stock_code) "
                 "ORDER BY embedding <=> :q LIMIT 10"),
            {"q": synthetic_catalog["query"].astype(np.float32)},
        ).all()
    assert len(rows) < 10


def test_similar_products_excludes_itself_and_non_products(synthetic_catalog):
    settings = synthetic_catalog["settings"]
    anchor = synthetic_catalog["nearest"][0]
    neighbour = synthetic_catalog["nearest"][1]
    with get_engine(settings).begin() as conn:
        conn.execute(text("UPDATE products SET is_non_product = true WHERE stock_code = :c"), {"c": neighbour})
        rows = conn.execute(text("SELECT * FROM similar_products(:c, 5)"), {"c": anchor}).all()
    codes = [r.stock_code for r in rows]
    assert len(codes) == 5 and anchor not in codes and neighbour not in codes
    assert [r.distance for r in rows] == sorted(r.distance for r in rows)
    assert similar("NO-SUCH-CODE", 5, settings) == []


@pytest.mark.parametrize("call", [
    "SELECT * FROM similar_products('S00001', 0)",
    "SELECT * FROM search_products((SELECT embedding FROM products LIMIT 1), -3)",
    "SELECT * FROM hybrid_search('x', NULL, 0)",
])
def test_bad_k_is_a_clear_error(synthetic_catalog, call):
    with pytest.raises(DBAPIError, match="k must be a positive integer"):
        with get_engine(synthetic_catalog["settings"]).connect() as conn:
            conn.execute(text(call)).all()


def test_hybrid_finds_an_exact_word_the_vector_side_misses(synthetic_catalog):
    settings, query = synthetic_catalog["settings"], synthetic_catalog["query"]
    far_away = unit(-query + 0.01)
    with get_engine(settings).begin() as conn:
        conn.execute(
            text("INSERT INTO products (stock_code, description, embedding) "
                 "VALUES ('ZX1', 'ZANZIBAR TEAPOT', :v)"),
            {"v": far_away.astype(np.float32)},
        )
        vector_only = conn.execute(
            text("SELECT stock_code FROM search_products(:q, 10)"), {"q": query.astype(np.float32)}
        ).scalars().all()
        fused = conn.execute(
            text("SELECT stock_code, text_rank, vector_rank FROM hybrid_search('zanzibar', :q, 10)"),
            {"q": query.astype(np.float32)},
        ).all()
    assert "ZX1" not in vector_only
    hit = next(r for r in fused if r.stock_code == "ZX1")
    assert hit.text_rank == 1 and hit.vector_rank is None


def test_customer_history_function(loaded_db):
    with get_engine(loaded_db).connect() as conn:
        rows = conn.execute(text("SELECT * FROM customer_history(15781, 2)")).all()
        none = conn.execute(text("SELECT * FROM customer_history(15781, 0)")).all()
        unknown = conn.execute(text("SELECT * FROM customer_history(4242, 5)")).all()
    assert [r.description for r in rows] == ["ALARM CLOCK BAKELIKE PINK", "NOEL GARLAND PAINTED ZINC"]
    assert rows[0].quantity == 4 and rows[0].times_bought == 1
    assert none == [] and unknown == []


def test_views_and_their_refresh_after_ingest(db, tmp_path):
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    lines = [f"{inv},{code},ITEM {code},1,2011-01-0{day} 10:00:00,1.0,{cust},UK"
             for inv, day, cust in (("A1", 1, 100), ("A2", 2, 101)) for code in ("10001", "10002", "10003")]
    first = tmp_path / "first.csv"
    first.write_text(header + "\n".join(lines[:6]) + "\n")
    ingest_file(first, db)
    engine = get_engine(db)
    with engine.connect() as conn:
        pair = conn.execute(text("SELECT invoices FROM copurchase WHERE stock_code = '10001' "
                                 "AND other_stock_code = '10002'")).scalar_one()
        popular = conn.execute(text("SELECT * FROM product_popularity WHERE stock_code = '10001'")).one()
    assert pair == 2
    assert (popular.customers, popular.invoices, popular.popularity_rank) == (2, 2, 1)
    second = tmp_path / "second.csv"
    second.write_text(header + "A3,10001,ITEM 10001,1,2011-01-05 10:00:00,1.0,102,UK\n"
                      "A3,10002,ITEM 10002,1,2011-01-05 10:00:00,1.0,102,UK\n")
    ingest_file(second, db)
    with engine.connect() as conn:
        pair = conn.execute(text("SELECT invoices FROM copurchase WHERE stock_code = '10001' "
                                 "AND other_stock_code = '10002'")).scalar_one()
    assert pair == 3
    stats = DatabaseItemStats(db)
    assert stats.copurchase(["10001"], ["10002", "10003"]) == {"10002": 3.0, "10003": 2.0}
    assert stats.copurchase_pairs([("10001", "10002"), ("10002", "10001"), ("10001", "10001")]) == {
        ("10001", "10002"): 3.0, ("10002", "10001"): 3.0}
    assert stats.popularity(["10001", "10003"]) == {"10001": 3.0, "10003": 2.0}


def test_python_layer_search_modes(loaded_db):
    bought = {h.stock_code for h in history(15781, 50, "recent", loaded_db)}
    hits = search("lantern", 5, loaded_db, customer_id=15781, exclude_purchased=True)
    assert len(hits) == 5 and not bought & {h.stock_code for h in hits}
    fused = search("retrospot", 3, loaded_db, hybrid=True)
    assert fused[0].description == "LUNCH BAG RED RETROSPOT"
    with pytest.raises(ValueError, match="needs a customer"):
        search("lantern", 5, loaded_db, exclude_purchased=True)


def test_history_vector_is_the_normalized_mean(loaded_db):
    vector = history_vector(15781, 3, loaded_db)
    assert vector is not None and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert history_vector(4242, 3, loaded_db) is None


def test_batched_histories_match_one_at_a_time(loaded_db):
    customers = [15781, 17850, 4242]
    batched = recent_histories(customers, 5, loaded_db)
    assert set(batched) == set(customers) and batched[4242] == []
    for customer in customers:
        assert batched[customer] == history(customer, 5, "recent", loaded_db)
    vectors = history_vectors(customers, 5, loaded_db)
    assert set(vectors) == {15781, 17850}
    np.testing.assert_allclose(vectors[15781], history_vector(15781, 5, loaded_db), atol=1e-6)


def test_cli_similar_and_search_flags(loaded_db):
    import json

    runner = CliRunner()
    result = runner.invoke(cli, ["similar", "71053", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert "71053" not in {h["stock_code"] for h in json.loads(result.output)}
    result = runner.invoke(cli, ["similar", "NOPE", "-k", "3"])
    assert result.exit_code == 2 and "unknown stock code" in result.output
    result = runner.invoke(cli, ["search", "lantern", "-k", "3", "--customer", "15781", "--exclude-purchased",
                                 "--json"])
    assert result.exit_code == 0 and "22224" not in result.output
    result = runner.invoke(cli, ["search", "lantern", "--exclude-purchased"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["search", "retrospot", "--hybrid", "-k", "1", "--json"])
    assert json.loads(result.output)[0]["stock_code"] == "20725"


def test_vectors_cross_as_pgvector_types(synthetic_catalog):
    """numpy arrays are sent as `vector` parameters and vectors come back as pgvector.Vector (the
    engine registers pgvector's psycopg types), so no code writes vector text by hand."""
    settings, query = synthetic_catalog["settings"], synthetic_catalog["query"]
    with get_engine(settings).connect() as conn:
        stored = conn.execute(text("SELECT embedding FROM products WHERE stock_code = 'S00000'")).scalar_one()
        kind = conn.execute(text("SELECT pg_typeof(:q)::text"), {"q": query.astype(np.float32)}).scalar_one()
        nearest = conn.execute(
            text("SELECT stock_code FROM products ORDER BY embedding <=> :v LIMIT 1"), {"v": stored.to_numpy()}
        ).scalar_one()
    assert isinstance(stored, Vector) and stored.to_numpy().shape == (DIM,)
    assert kind == "vector" and nearest == "S00000"
