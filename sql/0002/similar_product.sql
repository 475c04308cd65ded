-- The row type of similar_products: a named type lets that function's parameter be called
-- stock_code like the column it returns.
CREATE TYPE similar_product AS (stock_code text, description text, distance double precision);
