-- Statement trigger function on products: any statement that can change what vector search or a
-- product listing returns (new or deleted products, changed descriptions, embeddings or flags)
-- moves the catalog version on, so every result-cache key computed after it misses.
CREATE FUNCTION bump_catalog_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_version SET version = version + 1, changed_at = now();
    RETURN NULL;
END
$$;
