CREATE FUNCTION customer_history(customer_id bigint, n integer DEFAULT 10)
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
