-- Pairs of products bought in the same invoice (each invoice counted once per pair),
-- kept where the pair occurs in at least two invoices. Refreshed after every ingest.
CREATE MATERIALIZED VIEW copurchase AS
WITH invoice_items AS (
    SELECT DISTINCT pu.invoice_no, pu.stock_code
    FROM purchases pu JOIN products p USING (stock_code)
    WHERE NOT p.is_non_product
)
SELECT a.stock_code AS stock_code,
       b.stock_code AS other_stock_code,
       count(*)::integer AS invoices
FROM invoice_items a
JOIN invoice_items b ON a.invoice_no = b.invoice_no AND a.stock_code <> b.stock_code
GROUP BY a.stock_code, b.stock_code
HAVING count(*) >= 2
WITH NO DATA;

CREATE UNIQUE INDEX ix_copurchase_pair ON copurchase (stock_code, other_stock_code);

COMMENT ON MATERIALIZED VIEW copurchase IS
    'Item-to-item co-occurrence: for each ordered pair of products, the number of invoices that contain both '
    '(pairs seen in fewer than two invoices are left out). Refreshed by recsys ingest.';
