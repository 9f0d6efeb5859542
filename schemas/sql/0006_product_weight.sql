-- A product's weight in grams (product.created.v2, issue 20): NULL when unknown, as for every
-- product created before it; set at creation only. The column alone is a catalogue change; its
-- check is added NOT VALID and then validated, which scans the table without blocking writes.
ALTER TABLE products ADD COLUMN weight_grams bigint;
ALTER TABLE products ADD CONSTRAINT products_weight_grams_check CHECK (weight_grams >= 0) NOT VALID;
ALTER TABLE products VALIDATE CONSTRAINT products_weight_grams_check;
