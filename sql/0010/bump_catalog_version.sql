-- Statement trigger function on products: every statement that changed products (ingest, embedding,
-- a SQL user's change) moves the catalog version on, so every result-cache key computed after it
-- misses. A statement that changed no row (an ingest's INSERT ... ON CONFLICT DO NOTHING of products it
-- has) leaves it, and the cache, as they were. `changed_products` is the statement's transition table.
CREATE FUNCTION bump_catalog_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE catalog_version SET version = version + 1, changed_at = now();
    ELSIF EXISTS (SELECT 1 FROM changed_products) THEN
        UPDATE catalog_version SET version = version + 1, changed_at = now();
    END IF;
    RETURN NULL;
END
$$;
