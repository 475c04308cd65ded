-- Retrieval function for SQL users and for recsys.catalog.retrieval. Set hnsw.ef_search in your
-- session (default 40) to trade recall for latency; the function turns on iterative index
-- scans itself so filters never starve a result.

CREATE FUNCTION similar_products(stock_code text, k integer DEFAULT 10)
RETURNS SETOF similar_product
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
AS $$
DECLARE
    anchor vector;
BEGIN
    IF k IS NULL OR k <= 0 THEN
        RAISE EXCEPTION 'k must be a positive integer, got %', k USING ERRCODE = '22023';
    END IF;
    SELECT p.embedding INTO anchor FROM products p WHERE p.stock_code = similar_products.stock_code;
    IF anchor IS NULL THEN
        RETURN;  -- unknown or not yet embedded product: no rows
    END IF;
    RETURN QUERY
    WITH nearest AS MATERIALIZED (
        SELECT p.stock_code, p.description, p.embedding <=> anchor AS distance
        FROM products p
        WHERE p.embedding IS NOT NULL
          AND NOT p.is_non_product
          AND p.stock_code <> similar_products.stock_code
        ORDER BY p.embedding <=> anchor
        LIMIT k
    )
    SELECT n.stock_code, n.description, n.distance FROM nearest n ORDER BY n.distance, n.stock_code;
END;
$$;

COMMENT ON FUNCTION similar_products(text, integer) IS
    'The k products nearest to the given one by embedding (cosine distance, smallest first), '
    'excluding the product itself and non-products. Unknown codes give no rows; k <= 0 is an error.';
