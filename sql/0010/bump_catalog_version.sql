-- Statement trigger function on products: every statement that writes products (ingest, embedding,
-- a SQL user's change) moves the catalog version on, so every result-cache key computed after it misses.
CREATE FUNCTION bump_catalog_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_version SET version = version + 1, changed_at = now();
    RETURN NULL;
END
$$;
