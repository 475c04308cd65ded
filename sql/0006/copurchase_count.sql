-- Adds the invoices of newly inserted purchase lines to the co-purchase counts, touching only the
-- invoices those lines belong to (an appended day of purchases recounts a few thousand pairs, not all).
-- A pair gains one invoice where the line's product was not in that invoice before; pairs seen in
-- one invoice wait in copurchase_singles until a second invoice moves them into copurchase.
-- The statement is planned for each call with the ids it gets (EXECUTE), so a day's few hundred lines
-- are looked up through the indexes while a large append still gets hash joins.
CREATE FUNCTION copurchase_count(new_purchase_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
EXECUTE $sql$
WITH new_lines AS (
    SELECT pu.id, pu.invoice_no, pu.stock_code
    FROM unnest($1::bigint[]) AS n(id) JOIN purchases pu ON pu.id = n.id
), new_items AS (
    SELECT DISTINCT n.invoice_no, n.stock_code
    FROM new_lines n JOIN products p ON p.stock_code = n.stock_code AND NOT p.is_non_product
    WHERE NOT EXISTS (
        SELECT 1 FROM purchases o
        WHERE o.invoice_no = n.invoice_no AND o.stock_code = n.stock_code
          AND NOT EXISTS (SELECT 1 FROM new_lines x WHERE x.id = o.id)
    )
), items AS (
    SELECT DISTINCT pu.invoice_no, pu.stock_code, ni.stock_code IS NOT NULL AS is_new
    FROM purchases pu
    JOIN products p ON p.stock_code = pu.stock_code AND NOT p.is_non_product
    LEFT JOIN new_items ni ON ni.invoice_no = pu.invoice_no AND ni.stock_code = pu.stock_code
    WHERE pu.invoice_no IN (SELECT invoice_no FROM new_items)
), delta AS (
    SELECT a.stock_code, b.stock_code AS other_stock_code, count(*)::integer AS invoices
    FROM items a JOIN items b ON a.invoice_no = b.invoice_no AND a.stock_code <> b.stock_code
    WHERE a.is_new OR b.is_new
    GROUP BY a.stock_code, b.stock_code
), bumped AS (
    UPDATE copurchase c SET invoices = c.invoices + d.invoices
    FROM delta d
    WHERE c.stock_code = d.stock_code AND c.other_stock_code = d.other_stock_code
    RETURNING c.stock_code
), promoted AS (
    DELETE FROM copurchase_singles s USING delta d
    WHERE s.stock_code = d.stock_code AND s.other_stock_code = d.other_stock_code
    RETURNING s.stock_code, s.other_stock_code, 1 + d.invoices AS invoices
), fresh AS (
    SELECT d.stock_code, d.other_stock_code, d.invoices
    FROM delta d
    WHERE NOT EXISTS (SELECT 1 FROM copurchase c
                      WHERE c.stock_code = d.stock_code AND c.other_stock_code = d.other_stock_code)
      AND NOT EXISTS (SELECT 1 FROM copurchase_singles s
                      WHERE s.stock_code = d.stock_code AND s.other_stock_code = d.other_stock_code)
), singles AS (
    INSERT INTO copurchase_singles (stock_code, other_stock_code)
    SELECT stock_code, other_stock_code FROM fresh WHERE invoices = 1
    RETURNING stock_code
)
INSERT INTO copurchase (stock_code, other_stock_code, invoices)
SELECT stock_code, other_stock_code, invoices FROM promoted
UNION ALL
SELECT stock_code, other_stock_code, invoices FROM fresh WHERE invoices >= 2
$sql$ USING new_purchase_ids;
END
$fn$;

COMMENT ON FUNCTION copurchase_count(bigint[]) IS
    'Adds the invoices of the given new purchase lines to copurchase (and copurchase_singles); '
    'called by the purchases insert trigger and by recsys ingest.';
