-- Statement trigger function on purchases: every insert (an ingest, a purchase reported through
-- feedback, a SQL user's INSERT) keeps copurchase up to date. recsys ingest sets
-- recsys.copurchase_deferred = 'on' for its transaction and counts (or rebuilds) once at the end.
CREATE FUNCTION copurchase_count_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('recsys.copurchase_deferred', true), '') <> 'on' THEN
        PERFORM copurchase_count(ARRAY(SELECT id FROM inserted_purchases));
    END IF;
    RETURN NULL;
END
$$;
