-- Popularity statistics, for analysts and for the classical rankers.

CREATE VIEW product_popularity AS
SELECT p.stock_code,
       p.description,
       p.is_non_product,
       count(pu.id) AS purchase_lines,
       count(DISTINCT pu.invoice_no) AS invoices,
       count(DISTINCT pu.customer_id) AS customers,
       coalesce(sum(pu.quantity), 0) AS quantity,
       max(pu.invoiced_at) AS last_purchased_at,
       rank() OVER (ORDER BY count(DISTINCT pu.customer_id) DESC, count(pu.id) DESC) AS popularity_rank
FROM products p
LEFT JOIN purchases pu ON pu.stock_code = p.stock_code
GROUP BY p.stock_code, p.description, p.is_non_product;

COMMENT ON VIEW product_popularity IS
    'One row per product: purchase lines, invoices, distinct customers, total quantity, last purchase, '
    'and popularity_rank (1 = bought by the most customers).';
