-- Retrieval functions for SQL users and for recsys.retrieval. Set hnsw.ef_search in your
-- session (default 40) to trade recall for latency; the functions turn on iterative index
-- scans themselves so filters never starve a result.

DO $$
BEGIN
    -- A named row type lets the function's parameter be called stock_code like the column it returns.
    CREATE TYPE similar_product AS (stock_code text, description text, distance double precision);
EXCEPTION WHEN duplicate_object THEN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION similar_products(stock_code text, k integer DEFAULT 10)
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


CREATE OR REPLACE FUNCTION search_products(query_embedding vector, k integer, exclude_customer bigint DEFAULT NULL)
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


CREATE OR REPLACE FUNCTION hybrid_search(query_text text, query_embedding vector, k integer)
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


CREATE OR REPLACE FUNCTION customer_history(customer_id bigint, n integer DEFAULT 10)
RETURNS TABLE (stock_code text, description text, last_purchased_at timestamp, quantity bigint, times_bought bigint)
LANGUAGE sql STABLE
AS $$
    SELECT h.stock_code, p.description, h.last_at, h.quantity, h.times_bought
    FROM (
        SELECT pu.stock_code, max(pu.invoiced_at) AS last_at, sum(pu.quantity) AS quantity,
               count(DISTINCT pu.invoice_no) AS times_bought
        FROM purchases pu
        WHERE pu.customer_id = customer_history.customer_id
        GROUP BY pu.stock_code
    ) h JOIN products p ON p.stock_code = h.stock_code
    ORDER BY h.last_at DESC, h.stock_code
    LIMIT greatest(n, 0);
$$;

COMMENT ON FUNCTION customer_history(bigint, integer) IS
    'The distinct products a customer bought, most recently bought first, with total quantity and the number '
    'of invoices they appear in. Unknown customers and n <= 0 give no rows.';
