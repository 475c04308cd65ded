-- Retrieval function for SQL users and for recsys.catalog.retrieval. Set hnsw.ef_search in your
-- session (default 40) to trade recall for latency; the function turns on iterative index
-- scans itself so filters never starve a result.

CREATE FUNCTION hybrid_search(query_text text, query_embedding vector, k integer)
RETURNS TABLE (stock_code text, description text, score double precision, text_rank integer, vector_rank integer)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
AS $$
DECLARE
    pool integer;
BEGIN
    IF k IS NULL OR k <= 0 THEN
        RAISE EXCEPTION 'k must be a positive integer, got %', k USING ERRCODE = '22023';
    END IF;
    pool := greatest(k * 4, 40);
    RETURN QUERY
    WITH text_hits AS (
        SELECT p.stock_code,
               row_number() OVER (ORDER BY ts_rank_cd(p.search_tsv, q.query) DESC, p.stock_code)::integer AS r
        FROM products p, websearch_to_tsquery('english', coalesce(query_text, '')) AS q(query)
        WHERE p.search_tsv @@ q.query AND NOT p.is_non_product
        ORDER BY r
        LIMIT pool
    ), vector_hits AS (
        SELECT s.stock_code, row_number() OVER (ORDER BY s.distance, s.stock_code)::integer AS r
        FROM search_products(query_embedding, pool) s
        WHERE query_embedding IS NOT NULL
    ), fused AS (
        SELECT coalesce(t.stock_code, v.stock_code) AS stock_code,
               coalesce(1.0 / (60 + t.r), 0) + coalesce(1.0 / (60 + v.r), 0) AS score,
               t.r AS text_rank, v.r AS vector_rank
        FROM text_hits t FULL OUTER JOIN vector_hits v ON t.stock_code = v.stock_code
    )
    SELECT f.stock_code, p.description, f.score::double precision, f.text_rank, f.vector_rank
    FROM fused f JOIN products p ON p.stock_code = f.stock_code
    ORDER BY f.score DESC, f.stock_code
    LIMIT k;
END;
$$;

COMMENT ON FUNCTION hybrid_search(text, vector, integer) IS
    'Reciprocal-rank fusion (constant 60) of Postgres full-text search over descriptions and vector search: '
    'the k best products with their fused score and their rank on each side (null where absent). '
    'query_embedding may be null for text-only search.';
