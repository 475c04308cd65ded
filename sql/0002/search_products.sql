-- Retrieval function for SQL users and for recsys.catalog.retrieval. Set hnsw.ef_search in your
-- session (default 40) to trade recall for latency; the function turns on iterative index
-- scans itself so filters never starve a result.

CREATE FUNCTION search_products(query_embedding vector, k integer, exclude_customer bigint DEFAULT NULL)
RETURNS TABLE (stock_code text, description text, distance double precision, score double precision)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
AS $$
BEGIN
    IF k IS NULL OR k <= 0 THEN
        RAISE EXCEPTION 'k must be a positive integer, got %', k USING ERRCODE = '22023';
    END IF;
    IF query_embedding IS NULL THEN
        RAISE EXCEPTION 'query_embedding must not be null' USING ERRCODE = '22004';
    END IF;
    RETURN QUERY
    WITH nearest AS MATERIALIZED (
        SELECT p.stock_code, p.description, p.embedding <=> query_embedding AS distance
        FROM products p
        WHERE p.embedding IS NOT NULL
          AND NOT p.is_non_product
          AND (exclude_customer IS NULL OR NOT EXISTS (
                SELECT 1 FROM purchases pu
                WHERE pu.customer_id = exclude_customer AND pu.stock_code = p.stock_code))
        ORDER BY p.embedding <=> query_embedding
        LIMIT k
    )
    SELECT n.stock_code, n.description, n.distance, 1 - n.distance FROM nearest n ORDER BY n.distance, n.stock_code;
END;
$$;

COMMENT ON FUNCTION search_products(vector, integer, bigint) IS
    'Candidates for a query embedding: the k nearest recommendable products (distance = cosine distance, '
    'score = 1 - distance). With exclude_customer, products that customer already bought are left out and '
    'k rows still come back (iterative HNSW scan).';
