"""Embeddings, HNSW search, history order and stats against the real database."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from recsys.catalog.embedding import embed_products, encode, resolve_model_path
from recsys.catalog.history import history
from recsys.catalog.retrieval import search, stats
from recsys.cli import cli
from recsys.platform.db import get_engine


def test_embed_fills_every_product_once(loaded_db):
    with get_engine(loaded_db).connect() as conn:
        missing = conn.execute(text("SELECT count(*) FROM products WHERE embedding IS NULL")).scalar_one()
        norms = conn.execute(text("SELECT vector_norm(embedding) FROM products")).scalars().all()
    assert missing == 0
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert embed_products(loaded_db).embedded == 0


def test_model_change_re_embeds(loaded_db):
    local_path = resolve_model_path(loaded_db.embedding_model)
    changed = loaded_db.with_(embedding_model=local_path)
    report = embed_products(changed)
    assert report.embedded == stats(changed)["products"]
    with get_engine(changed).connect() as conn:
        models = conn.execute(text("SELECT DISTINCT embedding_model FROM products")).scalars().all()
    assert models == [local_path]


def test_search_finds_lanterns_and_skips_non_products(loaded_db):
    hits = search("lantern", 3, loaded_db)
    assert len(hits) == 3
    assert all("LANTERN" in h.description for h in hits[:2])
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert "POST" not in {h.stock_code for h in search("postage", 10, loaded_db)}


def test_search_goes_through_the_hnsw_index(loaded_db):
    vector = "[" + ",".join(str(x) for x in encode(["lantern"], loaded_db)[0]) + "]"
    with get_engine(loaded_db).begin() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(conn.execute(text(
            "EXPLAIN SELECT stock_code FROM products ORDER BY embedding <=> CAST(:q AS vector) LIMIT 3"
        ), {"q": vector}).scalars())
    assert "ix_products_embedding_hnsw" in plan


def test_search_rejects_bad_k(loaded_db):
    with pytest.raises(ValueError, match="positive"):
        search("lantern", 0, loaded_db)


def test_history_orders(loaded_db):
    recent = [h.description for h in history(15781, 10, "recent", loaded_db)]
    assert recent[0] == "ALARM CLOCK BAKELIKE PINK"
    assert recent[1] == "NOEL GARLAND PAINTED ZINC"
    seed = [h.description for h in history(15781, 3, "seed", loaded_db)]
    assert seed == ["EDWARDIAN PARASOL NATURAL", "BLUE STRIPE CERAMIC DRAWER KNOB", "WHITE LOVEBIRD LANTERN"]
    assert history(99999, 5, "recent", loaded_db) == []
    with pytest.raises(ValueError):
        history(15781, 3, "random", loaded_db)


def test_history_counts(loaded_db):
    knob = next(h for h in history(17850, 10, "recent", loaded_db) if h.stock_code == "21669")
    assert (knob.quantity, knob.times_bought) == (12, 1)


def test_cli_read_commands(loaded_db):
    runner = CliRunner()
    result = runner.invoke(cli, ["stats", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["purchases"] == 20 and data["embedded_products"] == data["products"]
    assert data["embedding_model"] == loaded_db.embedding_model

    result = runner.invoke(cli, ["search", "lantern", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert [set(hit) for hit in json.loads(result.output)] == [{"stock_code", "description", "score"}] * 3

    result = runner.invoke(cli, ["history", "15781", "-n", "3", "--order", "seed", "--json"])
    assert [row["description"] for row in json.loads(result.output)][0] == "EDWARDIAN PARASOL NATURAL"

    result = runner.invoke(cli, ["search", "lantern", "-k", "0"])
    assert result.exit_code == 2 and "positive" in result.output


def test_query_encoding_is_remembered_and_bf16_stays_close(loaded_db):
    from recsys.catalog import embedding

    exact = loaded_db.with_(query_dtype="float32")
    fast = loaded_db.with_(query_dtype="bfloat16")
    queries = ["metal lantern", "bag charm", "metal lantern"]
    reference = encode(queries, exact)
    first = embedding.encode_queries(queries, exact)
    np.testing.assert_allclose(first, reference, atol=1e-6)
    assert embedding.encode_queries(["bag charm"], exact)[0] is not None
    assert ("all-MiniLM-L6-v2", False, "bag charm") in embedding._query_vectors
    approximate = embedding.encode_queries(queries, fast)
    assert (approximate * reference).sum(axis=1).min() > 0.999
    assert ("all-MiniLM-L6-v2", True, "bag charm") in embedding._query_vectors
    with pytest.raises(embedding.EmbeddingError, match="RECSYS_QUERY_DTYPE"):
        embedding.query_dtype(loaded_db.with_(query_dtype="int4"))


def test_bf16_passes_with_weights_cast_once_give_the_vectors_autocast_gives(loaded_db):
    """The bf16 twin (Linear weights cast once) changes no bit of what autocast makes of the float32 model."""
    import torch

    from recsys.catalog import embedding

    texts = ["metal lantern", "bag charm", "WHITE HANGING HEART T-LIGHT HOLDER", "a", "picture frame with glass"]
    model = embedding.load_model(loaded_db.embedding_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.encode(texts, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)

    twin_vectors = embedding.encode(texts, loaded_db, batch_size=4, bfloat16=True)

    np.testing.assert_array_equal(twin_vectors, np.asarray(reference, dtype=np.float32))
    assert embedding._bfloat16_twin(model) is embedding._bfloat16_twin(model) is not model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert {m.weight.dtype for m in linears} == {torch.float32}  # the model itself keeps its float32 weights


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_query_passes_give_the_vectors_sentence_transformers_encode_gives(loaded_db, dtype):
    """A query pass skips `encode`'s bookkeeping, not a bit of its arithmetic, in either precision, for passes
    of one to a whole batch (texts of different lengths: `encode` reorders them by length, a pass does not)."""
    import torch

    from recsys.catalog import embedding

    settings = loaded_db.with_(query_dtype=dtype)
    texts = ["metal lantern", "bag charm", "WHITE HANGING HEART T-LIGHT HOLDER", "a", "picture frame with glass",
             "set of 3 cake tins pantry design", "red retrospot", "jumbo bag", "a" * 300]
    model = embedding.load_model(settings.embedding_model)
    bfloat16 = dtype == "bfloat16"
    for size in (1, 4, len(texts)):
        for start in range(0, len(texts), size):
            chunk = texts[start:start + size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                reference = model.encode(chunk, batch_size=settings.embedding_batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True)
            np.testing.assert_array_equal(embedding._encode_query_pass(model, chunk, settings, bfloat16), reference)


def test_a_pass_waiting_for_the_encoder_takes_what_a_warm_up_pass_encoded_meanwhile(monkeypatch):
    """A worker's batch that finds its queries missing waits for the encoder while the warm-up thread encodes
    them; once it has the encoder it uses those vectors instead of encoding the same queries again."""
    import threading

    from recsys.catalog import embedding
    from recsys.config import Settings

    settings = Settings(query_dtype="float32")
    queries = ["warm-up race query one", "warm-up race query two"]
    warmed = {query: np.full(384, i + 1.0, dtype=np.float32) for i, query in enumerate(queries)}
    reached_the_encoder = threading.Event()
    passes = []

    def model_then_signal(name):
        reached_the_encoder.set()  # the pass has looked in the cache and found nothing
        return object()

    monkeypatch.setattr(embedding, "load_model", model_then_signal)
    monkeypatch.setattr(embedding, "_encode_query_pass", lambda *args: passes.append(args))
    found = []
    try:
        with embedding._encode_lock:  # the warm-up pass holds the encoder
            waiting = threading.Thread(target=lambda: found.append(embedding.encode_queries(queries, settings)))
            waiting.start()
            assert reached_the_encoder.wait(30)
            embedding._remember(dict(warmed), settings.embedding_model, False)
        waiting.join(30)
    finally:
        for query in queries:
            embedding._query_vectors.pop((settings.embedding_model, False, query), None)
    assert passes == []
    np.testing.assert_array_equal(found[0], np.stack([warmed[q] for q in queries]))
