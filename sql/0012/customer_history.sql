CREATE FUNCTION customer_history(customer_id bigint, n integer DEFAULT 10)
RETURNS TABLE (stock_code text, description text, last_purchased_at timestamp, quantity bigint, times_bought bigint)
LANGUAGE sql STABLE
AS $$
    -- the n newest products are chosen before their descriptions are looked up: every purchase's stock code
    -- is a product's (NOT NULL, foreign key), so the join keeps every row and only n lookups are made
    SELECT h.stock_code, p.description, h.last_at, h.quantity, h.times_bought
    FROM (
        SELECT pu.stock_code, max(pu.invoiced_at) AS last_at, sum(pu.quantity) AS quantity,
               count(DISTINCT pu.invoice_no) AS times_bought
        FROM purchases pu
        WHERE pu.customer_id = customer_history.customer_id
        GROUP BY pu.stock_code
        ORDER BY last_at DESC, pu.stock_code
        LIMIT greatest(n, 0)
    ) h JOIN products p ON p.stock_code = h.stock_code
    ORDER BY h.last_at DESC, h.stock_code;
$$;

COMMENT ON FUNCTION customer_history(bigint, integer) IS
    'The distinct products a customer bought, most recently bought first, with total quantity and the number '
    'of invoices they appear in. Unknown customers and n <= 0 give no rows.';
