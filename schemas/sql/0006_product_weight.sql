-- A product's weight in grams (product.created.v2, issue 20): NULL when unknown, as for every
-- product created before it; set at creation only.
ALTER TABLE products ADD COLUMN weight_grams bigint CHECK (weight_grams >= 0);
